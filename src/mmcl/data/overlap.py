"""Pre-flight leak check: nothing a run trains on may be a record it is scored on.

An evaluated record is every test record of every task and retention task of the stream. Two records are the
same when their normalised prompts are equal (human turns, modality placeholders dropped, lower case, every run of
non-alphanumeric characters one space) and their media have the same bytes (compared by size first and hashed only
when prompts and sizes already match, so a big real dataset is mostly not read at all).

What a run trains on: each task's own train split (the plain case), and whatever a strategy adds besides it,
declared by `extra_training_data(ctx)` as a list of `ExtraData` (instruction pools, replay/rehearsal sources, the
prompts and inputs pseudo targets are made of). `check_run` refuses a run with a `DataError` naming each
overlapping pair: task, split, file:line and id of the evaluated record, where the training side comes from, and the
text.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmcl.data.records import PLACEHOLDER, DataError, Record

if TYPE_CHECKING:
    from mmcl.data.records import Stream

_NON_WORD = re.compile(r"[^0-9a-z]+")
SHOWN = 20
"""Overlapping pairs listed in the error (the count says how many there are in all)."""


def normalise_prompt(conversations: Sequence[dict] | str) -> str:
    """The prompt as the leak check compares it: the human turns joined, modality placeholders dropped, lower
    case, every run of non-alphanumeric characters one space ("What is 3 plus 4?" == "what is 3 plus 4")."""
    if isinstance(conversations, str):
        text = conversations
    else:
        text = " ".join(str(t.get("value", "")) for t in conversations if t.get("from") == "human")
    for mark in PLACEHOLDER.values():
        text = text.replace(mark, " ")
    return _NON_WORD.sub(" ", text.lower()).strip()


@dataclass(frozen=True)
class ExtraData:
    """Training inputs a strategy adds besides the current task's train split: every prompt in `prompts` may be
    paired with every media set in `media` (`{}` is "no media"), so a pool of text instructions is
    `ExtraData(source, prompts, [{}])` and pseudo captions asked of every input of a task are
    `ExtraData(source, [prompt], [inputs' media])`. `where` names each prompt's origin (file:line), when known."""

    source: str
    prompts: tuple[str, ...]
    media: tuple[dict[str, Path], ...] = ({},)
    where: tuple[str, ...] = ()

    @classmethod
    def of_records(cls, source: str, records: Iterable[Record]) -> list[ExtraData]:
        """One entry per record: its own prompt with its own media."""
        return [cls(source, (normalise_prompt(r.conversations),), (dict(r.media),), (r.source,)) for r in records]

    @classmethod
    def pool(cls, source: str, prompts: Iterable[str], where: Iterable[str] = ()) -> ExtraData:
        """Text-only prompts (instructions)."""
        return cls(source, tuple(normalise_prompt(p) for p in prompts), ({},), tuple(where))


def earlier_train_splits(stream: Stream, records: dict[str, dict[str, list[Record]]], what: str) -> list[ExtraData]:
    """The train records of every task but the last: what replay, rehearsal and joint training may mix into a
    later task (one entry per record, so an overlap names the record)."""
    return [e for t in stream.tasks[:-1] for e in ExtraData.of_records(f"{what} from the train split of {t.name}",
                                                                       records[t.name].get("train", []))]


@dataclass(frozen=True)
class Overlap:
    """One training input that is also an evaluated record."""

    task: str
    split: str
    record_id: str
    at: str  # file:line of the evaluated record
    prompt: str  # normalised
    source: str  # where the training side comes from
    source_at: str = ""

    def line(self) -> str:
        origin = f"{self.source} ({self.source_at})" if self.source_at else self.source
        return f"  {self.task}/{self.split} {self.at} id={self.record_id}: {self.prompt!r} <- {origin}"


@dataclass
class _Evaluated:
    task: str
    split: str
    record: Record


@dataclass
class MediaIdentity:
    """Same file or same bytes. Sizes first (one stat per file); bytes are hashed only for files whose size equals
    that of a file they are compared with, so distinct compressed images are never read. Cached per path."""

    _sizes: dict[Path, int] = field(default_factory=dict)
    _digests: dict[Path, str] = field(default_factory=dict)  # resolved path -> digest
    _paths: dict[Path, str] = field(default_factory=dict)  # path as given -> digest

    def size(self, path: Path) -> int:
        if path not in self._sizes:
            self._sizes[path] = Path(path).stat().st_size
        return self._sizes[path]

    def digest(self, path: Path) -> str:
        if path not in self._paths:
            real = Path(path).resolve()
            if real not in self._digests:
                h = hashlib.blake2b(digest_size=16)
                with real.open("rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                self._digests[real] = h.hexdigest()
            self._paths[path] = self._digests[real]
        return self._paths[path]

    def sizes(self, media: dict[str, Path]) -> tuple[tuple[str, int], ...]:
        return tuple(sorted((m, self.size(p)) for m, p in media.items()))

    def of(self, media: dict[str, Path]) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((m, self.digest(p)) for m, p in media.items()))


def index_tests(tests: Iterable[tuple[str, Iterable[Record]]]) -> dict[str, list[_Evaluated]]:
    """Normalised prompt -> the evaluated records with that prompt, from (task name, test records) pairs."""
    index: dict[str, list[_Evaluated]] = {}
    for name, recs in tests:
        for r in recs:
            index.setdefault(normalise_prompt(r.conversations), []).append(_Evaluated(name, "test", r))
    return index


def evaluated_records(stream: Stream, records: dict[str, dict[str, list[Record]]]) -> dict[str, list[_Evaluated]]:
    """Normalised prompt -> the evaluated records with that prompt (test split of every task and retention task)."""
    return index_tests((t.name, records.get(t.name, {}).get("test", [])) for t in stream.all_tasks)


def find_overlaps(index: dict[str, list[_Evaluated]], extra: Iterable[ExtraData],
                  identity: MediaIdentity | None = None) -> list[Overlap]:
    """Every (evaluated record, training input) pair that is the same input; an evaluated record is reported once
    per source."""
    identity = identity or MediaIdentity()
    found: list[Overlap] = []
    seen: set[tuple[str, str, str]] = set()
    for item in extra:
        by_size: dict | None = None  # this item's media sets by their sizes, computed once and only when needed
        for k, prompt in enumerate(item.prompts):
            prompt = normalise_prompt(prompt)  # idempotent: a hand-built ExtraData may hold raw prompts
            for ev in index.get(prompt, ()):
                mark = (ev.task, ev.record.id, item.source)
                if mark in seen:
                    continue
                if by_size is None:
                    by_size = {}
                    for m in item.media:
                        by_size.setdefault(identity.sizes(m), []).append(m)
                same_size = by_size.get(identity.sizes(ev.record.media), [])
                if same_size and identity.of(ev.record.media) in {identity.of(m) for m in same_size}:
                    seen.add(mark)
                    found.append(Overlap(ev.task, ev.split, ev.record.id, ev.record.source, prompt, item.source,
                                         item.where[k] if k < len(item.where) else ""))
    return found


def _listing(found: list[Overlap]) -> str:
    shown = "\n".join(o.line() for o in found[:SHOWN])
    return shown + (f"\n  ... and {len(found) - SHOWN} more" if len(found) > SHOWN else "")


def check_run(ctx: Any, strategies: Sequence[Any], *, plain: str = "error", log=print) -> list[Overlap]:
    """Refuse the run (DataError) if any strategy's extra training data holds an evaluated record; called by
    `build_context` once records are read and strategies are built. A task's own train split holding an evaluated
    record (the plain case, a flaw of the data rather than of a method) is an error with `plain="error"` and a
    warning naming the records with `plain="warn"`. Returns the plain-case overlaps."""
    if plain not in ("warn", "error"):
        raise ValueError(f"plain must be 'warn' or 'error', got {plain!r}")
    index = evaluated_records(ctx.stream, ctx.records)
    identity = MediaIdentity()
    leaks: list[Overlap] = []
    for task in ctx.stream.tasks:
        train = ctx.records[task.name].get("train", [])
        leaks += find_overlaps(index, ExtraData.of_records(f"train split of {task.name}", train), identity)
    found: list[Overlap] = []
    for s in strategies:
        extra = [ExtraData(f"strategy {s.name}: {e.source}", e.prompts, e.media, e.where)
                 for e in s.extra_training_data(ctx)]
        found += find_overlaps(index, extra, identity)
    # a replayed train record that is an evaluated record is the plain case again, reported (and ruled) once
    known = {(o.task, o.record_id, o.source_at) for o in leaks}
    found = [o for o in found if not o.source_at or (o.task, o.record_id, o.source_at) not in known]
    if plain == "error":
        found = leaks + found
    if found:
        raise DataError(
            f"{len(found)} training input(s) are also evaluated records (same normalised prompt and media), so the "
            f"scores would measure memorisation, not retention or learning:\n{_listing(found)}\n"
            "Remove them from the training data or from the strategy's extra data (e.g. strategies.moincl."
            "instructions), or evaluate on records the run never trains on"
        )
    if leaks and plain == "warn":
        log(f"warning: {len(leaks)} test record(s) also appear in a train split (same normalised prompt and media); "
            f"their scores measure memorisation:\n{_listing(leaks)}")
    return leaks
