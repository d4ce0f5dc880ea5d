"""Shared machinery of the dataset adapters: the item shape, layout errors, and the task writer.

An adapter reads one published dataset layout and yields `Item`s per mmcl split; `write_task` turns them into an mmcl
task (task.yaml + <split>.jsonl in the LLaVA conversation format) whose `data_root` is the dataset's own media folder
(absolute, symlinks resolved), so no media is ever copied.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mmcl.data.records import PLACEHOLDER, DataError

SHORT_ANSWER = "Answer the question using a single word or phrase."


class SourceError(DataError):
    """A dataset directory does not have the published layout (a file or folder is missing or unreadable)."""


@dataclass
class Item:
    """One record to write: a stable key (unique within its split), the media path relative to the task's data root,
    the human prompt *without* the placeholder, the gpt answer and every reference answer."""

    key: str
    media: str
    prompt: str
    answer: str
    answers: list[str]


@dataclass
class Converted:
    """What an adapter read: the media folder (becomes `data_root`) and the items of each requested split."""

    data_root: Path
    splits: dict[str, list[Item]]
    notes: list[str] = field(default_factory=list)  # printed to stderr (skipped splits and the like)


@dataclass(frozen=True)
class Source:
    """A supported dataset: its task manifest fields, mmcl split names, documented layout and reader."""

    name: str
    modality: str
    type: str
    scorer: str
    splits: tuple[str, ...]
    layout: str
    description: str
    # read(source, src, requested splits or None for every available one) -> Converted (every item; convert() limits)
    read: Callable[[Source, Path, list[str] | None], Converted]

    def error(self, what: str) -> SourceError:
        return SourceError(f"{self.name}: {what}; expected layout:\n{self.layout.rstrip()}")

    def require(self, path: Path, kind: str = "file") -> Path:
        ok = path.is_file() if kind == "file" else path.is_dir()
        if not ok:
            raise self.error(f"{path} not found")
        return path

    def pick_splits(self, requested: list[str] | None, files: dict[str, list[Path]]) -> tuple[list[str], list[str]]:
        """Choose the splits to convert: `files` maps each split to the source files it needs. Requested splits must
        all be present (else a layout error naming the missing file); by default every present split is taken and
        the others are noted as skipped; with none present the error names every expected file."""
        notes = []
        if requested is not None:
            for s in requested:
                for f in files[s]:
                    self.require(f)
            return list(requested), notes
        chosen = [s for s in self.splits if all(f.is_file() for f in files[s])]
        if not chosen:
            expected = sorted({str(f) for fs in files.values() for f in fs})
            raise self.error(f"none of the split files found ({', '.join(expected)} not found)")
        for s in self.splits:
            if s not in chosen:
                missing = [str(f) for f in files[s] if not f.is_file()]
                notes.append(f"skipping split {s!r}: {', '.join(missing)} not found")
        return chosen, notes


def read_json(source: Source, path: Path):
    source.require(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise source.error(f"{path} is not valid JSON ({e})") from e


def read_csv(source: Source, path: Path, columns: Iterable[str]) -> list[dict[str, str]]:
    source.require(path)
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in columns if c not in fields]
        if missing:
            raise source.error(f"{path} lacks column(s) {', '.join(missing)} (it has {', '.join(fields) or 'none'})")
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


def choose_splits(
    source: Source, by_split: dict[str, list], requested, what: str, where: str
) -> tuple[list[str], list[str]]:
    """The splits to write and notes: every non-empty split (noting the skipped ones), or exactly the requested
    ones, each of which must hold items."""
    if requested is None:
        chosen = [s for s in source.splits if by_split[s]]
        notes = [f"skipping split {s!r}: no {what} with that split in {where}" for s in source.splits if s not in chosen]
        if not chosen:
            raise source.error(f"no {what} in {where}")
        return chosen, notes
    empty = [s for s in requested if not by_split[s]]
    if empty:
        raise source.error(f"no {what} of split(s) {', '.join(empty)} in {where}")
    return list(requested), []


def majority(answers: list[str]) -> str:
    """The most common answer; ties go to the one given first."""
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_task(source: Source, converted: Converted, out: Path, *, log=None) -> Path:
    """Write out/<source.name>/ (task.yaml and one JSONL per split); report missing media on stderr."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    task_dir = Path(out) / source.name
    task_dir.mkdir(parents=True, exist_ok=True)
    root = converted.data_root.resolve()
    mark = PLACEHOLDER[source.modality]
    longest, missing, total = 1, [], 0
    for split, items in converted.splits.items():
        lines, seen = [], set()
        for item in items:
            rid = f"{source.name}-{split}-{item.key}"
            if rid in seen:  # an adapter bug, never a data condition: keys are unique by construction
                raise AssertionError(f"{source.name}: duplicate record id {rid!r}")
            seen.add(rid)
            rec = {
                "id": rid,
                source.modality: item.media,
                "conversations": [
                    {"from": "human", "value": f"{mark}\n{item.prompt}"},
                    {"from": "gpt", "value": item.answer},
                ],
                "answers": item.answers,
            }
            lines.append(json.dumps(rec, ensure_ascii=False))
            longest = max(longest, len(item.answer))
            total += 1
            if not (root / item.media).exists():
                missing.append(item.media)
        _write_atomic(task_dir / f"{split}.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    cap = 80 if source.type == "caption" else 32
    manifest = {
        "name": source.name,
        "modality": source.modality,
        "type": source.type,
        "scorer": source.scorer,
        "description": source.description,
        "data_root": str(root),
        "splits": {s: f"{s}.jsonl" for s in converted.splits},
        # Characters bound tokens for a byte-level tokenizer; capped so a stray long caption cannot blow the budget.
        "max_new_tokens": min(longest + 2, cap),
    }
    _write_atomic(task_dir / "task.yaml",
                  yaml.safe_dump(manifest, sort_keys=False, default_flow_style=None, width=119, allow_unicode=True))
    for note in converted.notes:
        log(f"{source.name}: {note}")
    counts = ", ".join(f"{s} {len(v)}" for s, v in converted.splits.items())
    log(f"{source.name}: wrote {total} records ({counts}) to {task_dir}")
    if missing:
        log(f"{source.name}: {len(missing)} of {total} {source.modality} files not found under {root} "
            f"(records written anyway; `mmcl data validate {task_dir}` lists them), e.g. {missing[0]}")
    return task_dir
