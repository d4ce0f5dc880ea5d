"""Tasks, streams and records on disk, and the pre-flight check that finds every bad record before training.

A task is a directory (or a `task.yaml`) naming its modality, type, scorer and split files; records are LLaVA
conversations in JSONL (or a LLaVA-style JSON list), with media paths relative to the task's data root. A stream
is an ordered list of train tasks plus evaluate-only retention tasks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

MODALITIES = ("image", "audio", "video")
TASK_TYPES = ("qa", "mcq", "caption", "grounding", "classification")
PLACEHOLDER = {"image": "<image>", "audio": "<audio>", "video": "<video>"}
REQUIRED_TASK_KEYS = ("name", "modality", "type", "scorer", "splits")


@dataclass
class Task:
    """One task of a stream: where its records are and how it is scored."""

    name: str
    modality: str  # image | audio | video | text
    type: str
    scorer: str
    splits: dict[str, Path]
    data_root: Path
    manifest: Path
    description: str = ""
    max_new_tokens: int = 16

    def split_path(self, split: str) -> Path:
        if split not in self.splits:
            raise KeyError(f"{self.manifest}: task {self.name!r} has no split {split!r} (it has {sorted(self.splits)})")
        return self.splits[split]


@dataclass
class Stream:
    name: str
    tasks: list[Task]
    retention: list[Task] = field(default_factory=list)
    path: Path | None = None
    description: str = ""

    @property
    def all_tasks(self) -> list[Task]:
        return self.tasks + self.retention


@dataclass
class Record:
    id: str
    conversations: list[dict]
    answers: list[str]
    media: dict[str, Path]
    source: str  # "file:line", for messages

    @property
    def answer(self) -> str:
        return self.conversations[-1]["value"]

    @property
    def references(self) -> list[str]:
        return self.answers or [self.answer]


@dataclass(frozen=True)
class Problem:
    """A bad record: where it is and why it cannot be used."""

    file: Path
    line: int
    reason: str
    id: str | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class DataError(ValueError):
    """Bad task, stream or record files; the message lists every problem as `file:line: reason`."""


# -- manifests --------------------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_task(path: str | Path) -> Task:
    """Load a task manifest (`task.yaml`, or a directory holding one)."""
    path = Path(path)
    manifest = path / "task.yaml" if path.is_dir() else path
    if not manifest.exists():
        raise DataError(f"{manifest}: task manifest not found (a task is a directory with a task.yaml)")
    data = _read_yaml(manifest)
    missing = [k for k in REQUIRED_TASK_KEYS if k not in data]
    if missing:
        raise DataError(f"{manifest}: missing field(s) {', '.join(missing)}; required: {', '.join(REQUIRED_TASK_KEYS)}")
    if data["modality"] not in (*MODALITIES, "text"):
        raise DataError(f"{manifest}: modality {data['modality']!r} must be one of {', '.join((*MODALITIES, 'text'))}")
    if not isinstance(data["splits"], dict) or not data["splits"]:
        raise DataError(f"{manifest}: splits must map split names to files, e.g. {{train: train.jsonl}}")
    base = manifest.parent
    return Task(
        name=str(data["name"]),
        modality=data["modality"],
        type=str(data["type"]),
        scorer=str(data["scorer"]),
        splits={k: base / v for k, v in data["splits"].items()},
        data_root=(base / data.get("data_root", ".")),
        manifest=manifest,
        description=str(data.get("description", "")),
        max_new_tokens=int(data.get("max_new_tokens", 16)),
    )


def load_stream(path: str | Path, order: list[str] | None = None) -> Stream:
    """Load a stream file; `order` (task names) re-orders its train tasks, e.g. for task-order studies."""
    path = Path(path)
    data = _read_yaml(path)
    if not data.get("tasks"):
        raise DataError(f"{path}: a stream needs a non-empty 'tasks' list of task directories")
    tasks = [load_task(path.parent / t) for t in data["tasks"]]
    retention = [load_task(path.parent / t) for t in data.get("retention") or []]
    names = [t.name for t in tasks + retention]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{path}: task names must be unique; repeated: {', '.join(dupes)}")
    if order:
        by_name = {t.name: t for t in tasks}
        unknown = [n for n in order if n not in by_name]
        if unknown or sorted(order) != sorted(by_name):
            raise DataError(
                f"data.order must be a permutation of the stream's tasks {list(by_name)}; got {order}"
                + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            )
        tasks = [by_name[n] for n in order]
    return Stream(str(data.get("name", path.stem)), tasks, retention, path, str(data.get("description", "")))


# -- records ----------------------------------------------------------------------------------------------------------


def _iter_raw(path: Path):
    """Yield (line number, parsed object or exception) for a JSONL file or a JSON list file."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            yield 1, ValueError(f"not valid UTF-8 (byte {e.start})")
            return
        except json.JSONDecodeError as e:
            yield e.lineno, ValueError(f"invalid JSON: {e.msg} (column {e.colno})")
            return
        if not isinstance(data, list):
            yield 1, ValueError("a .json split file must hold a list of records (LLaVA format)")
            return
        # A JSON list has no line per record; report the 1-based record number instead.
        yield from enumerate(data, 1)
        return
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, ValueError(f"not valid UTF-8 (byte {e.start} of the line)")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, ValueError(f"invalid JSON: {e.msg} (column {e.colno})")


def resolve_media(root: Path, rel: str, allow_outside_root: bool) -> Path:
    """Resolve a media path, refusing absolute paths and paths (or symlinks) that leave the data root."""
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"media path must be a non-empty string, got {rel!r}")
    p = Path(rel)
    if p.is_absolute() and not allow_outside_root:
        raise ValueError(f"media path {rel!r} is absolute; paths must be relative to the data root {root}")
    full = (root / p).resolve()
    if not allow_outside_root and not full.is_relative_to(root.resolve()):
        raise ValueError(
            f"media path {rel!r} resolves to {full}, outside the data root {root.resolve()} "
            "(set data.allow_outside_root=true only for data you trust)"
        )
    return full


def check_conversations(conv) -> str | None:
    """Why a conversation is unusable, or None: human/gpt turns alternating, starting with human, ending with a
    non-empty gpt answer."""
    if not isinstance(conv, list) or len(conv) < 2:
        return "'conversations' must be a list of at least two turns (human, then gpt)"
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return f"conversations[{k}] must be an object with 'from' and 'value'"
        if turn["from"] not in ("human", "gpt"):
            return f"conversations[{k}].from is {turn['from']!r}; expected 'human' or 'gpt'"
        if not isinstance(turn["value"], str):
            return f"conversations[{k}].value must be a string"
        expected = "human" if k % 2 == 0 else "gpt"
        if turn["from"] != expected:
            return f"conversations[{k}] is from {turn['from']!r} but turns must alternate human, gpt, ...; expected {expected!r}"
        if turn["from"] == "gpt" and not turn["value"].strip():
            return f"conversations[{k}] is an empty answer"
    if conv[-1]["from"] != "gpt":
        return "the last turn must be a gpt answer"
    return None


def read_records(
    task: Task,
    split: str,
    *,
    check_media: bool = True,
    allow_outside_root: bool = False,
    limit: int | None = None,
) -> tuple[list[Record], list[Problem]]:
    """Every good record of a split, and every problem found (bad JSON, fields, turns, media)."""
    path = task.split_path(split)
    if not path.exists():
        return [], [Problem(path, 0, f"split file not found (named in {task.manifest})")]
    good: list[Record] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    for lineno, obj in _iter_raw(path):
        if limit is not None and len(good) >= limit:
            break
        rid = obj.get("id") if isinstance(obj, dict) else None
        reason = _check_record(obj, task, seen)
        media: dict[str, Path] = {}
        if reason is None:
            for m in MODALITIES:
                if m in obj:
                    try:
                        media[m] = resolve_media(task.data_root, obj[m], allow_outside_root)
                    except ValueError as e:
                        reason = str(e)
                        break
                    if check_media:
                        reason = check_media_file(m, media[m])
                        if reason:
                            break
        if reason is not None:
            problems.append(Problem(path, lineno, reason, str(rid) if rid is not None else None))
            continue
        seen.add(str(obj["id"]))
        answers = obj.get("answers") or []
        good.append(Record(str(obj["id"]), obj["conversations"], [str(a) for a in answers], media, f"{path}:{lineno}"))
    return good, problems


def _check_record(obj, task: Task, seen: set[str]) -> str | None:
    if isinstance(obj, Exception):
        return str(obj)
    if not isinstance(obj, dict):
        return f"a record must be a JSON object, got {type(obj).__name__}"
    if obj.get("id") is None or not str(obj["id"]).strip():
        return "missing 'id'"
    if str(obj["id"]) in seen:
        return f"duplicate id {obj['id']!r}"
    if "conversations" not in obj:
        return "missing 'conversations'"
    reason = check_conversations(obj["conversations"])
    if reason:
        return reason
    if "answers" in obj and (not isinstance(obj["answers"], list) or not all(isinstance(a, str) for a in obj["answers"])):
        return "'answers' must be a list of strings"
    text = "".join(t["value"] for t in obj["conversations"] if t["from"] == "human")
    for m in MODALITIES:
        has_file, n_marks = m in obj, text.count(PLACEHOLDER[m])
        if has_file and m != task.modality:
            return f"record has {m!r} media but the task's modality is {task.modality!r}"
        if has_file and n_marks != 1:
            return f"record has {m!r} media, so its human turns need exactly one {PLACEHOLDER[m]} (found {n_marks})"
        if not has_file and n_marks:
            return f"text contains {PLACEHOLDER[m]} but the record has no {m!r} field"
    if task.modality in MODALITIES and task.modality not in obj:
        return f"missing {task.modality!r} (the task's modality is {task.modality})"
    return None


def check_media_file(modality: str, path: Path) -> str | None:
    """Why a media file cannot be decoded, or None. Cheap checks only: header decode, not the full file. A video
    may be a file PyAV opens or a folder of frame images (the first frame is checked)."""
    if not path.exists():
        return f"{modality} file not found: {path}"
    if path.stat().st_size == 0:
        return f"{modality} file is empty: {path}"
    try:
        if modality == "image":
            from PIL import Image

            with Image.open(path) as im:
                im.verify()
        elif modality == "audio":
            import soundfile

            soundfile.info(str(path))
        elif modality == "video" and path.is_dir():  # a folder of frame images, taken in name order
            from PIL import Image

            suffixes = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # as mmcl.models.builder.load_video reads
            frames = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes)
            if not frames:
                return f"video frame folder holds no frame images ({', '.join(suffixes)}): {path}"
            with Image.open(frames[0]) as im:
                im.verify()
        elif modality == "video":
            import av

            with av.open(str(path)) as c:
                if not c.streams.video:
                    return f"video file has no video stream: {path}"
    except Exception as e:  # any decoder error means the record is unusable
        return f"{modality} file cannot be decoded ({type(e).__name__}: {e}): {path}"
    return None


def records_file_task(path: Path, data_root: Path | None = None) -> Task:
    """A bare records file (LLaVA `.json` list or `.jsonl`) as a one-split task: its modality is the media key of
    its first record that has one (text when none has), media resolve against `data_root` (default: its folder)."""
    modality = "text"
    for _, obj in _iter_raw(path):
        found = [m for m in MODALITIES if isinstance(obj, dict) and m in obj]
        if found:
            modality = found[0]
            break
    return Task(name=path.stem, modality=modality, type="qa", scorer="exact_match", splits={"records": path},
                data_root=Path(data_root) if data_root else path.parent, manifest=path)


def validate_path(path: str | Path, *, allow_outside_root: bool = False,
                  data_root: str | Path | None = None) -> tuple[int, list[Problem]]:
    """Check a stream file, a task (dir or task.yaml), a world directory, or a bare records file (`.jsonl`, LLaVA
    `.json` list; media relative to its folder unless `data_root`); return (records checked, problems)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found (give a records .jsonl/.json file, a task, a stream YAML or a world)")
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        tasks = [records_file_task(path, Path(data_root) if data_root else None)]
    elif path.is_dir() and (path / "world.json").exists():
        streams = json.loads((path / "world.json").read_text()).get("streams", {})
        tasks = {t.manifest: t for s in streams.values() for t in load_stream(path / s).all_tasks}.values()
    elif path.suffix in (".yaml", ".yml") and path.name != "task.yaml":
        tasks = load_stream(path).all_tasks
    else:
        tasks = [load_task(path)]
    total, problems = 0, []
    for task in tasks:
        for split in task.splits:
            good, bad = read_records(task, split, allow_outside_root=allow_outside_root)
            total += len(good) + len(bad)
            problems += bad
    return total, problems


def format_problems(problems: list[Problem], limit: int = 50) -> str:
    lines = [str(p) for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    return "\n".join(lines)

