"""Tasks and records on disk, and the pre-flight check that finds every bad record before training.

A task is a directory (or a `task.yaml`) naming its modality, type, scorer and split files; records are LLaVA
conversations in JSONL (or a LLaVA-style JSON list), with media paths relative to the task's data root. Streams
(ordered train tasks plus retention tasks) are read by `mmcl.data.streams`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mmcl.yaml_files import read_yaml_mapping

MODALITIES = ("image", "audio", "video")
TASK_TYPES = ("qa", "mcq", "caption", "grounding", "classification")
PLACEHOLDER = {"image": "<image>", "audio": "<audio>", "video": "<video>"}
REQUIRED_TASK_KEYS = ("name", "modality", "type", "scorer", "splits")
MODEL_PARTS = ("encoders", "projectors", "language_model")
TEXT_FORMATS = ("chat", "plain")
CHOICE_SCORER = "loglik_choice"  # mmcl.eval.language: records carry "choices", scored by option log-likelihood
LM_EVAL_SCORER = "lm_eval"  # mmcl.eval.lm_eval_adapter: scored by lm-evaluation-harness, no records of its own
PROBES_DIR = Path(__file__).resolve().parents[1] / "eval" / "probes"
"""The language probes shipped with mmcl (`probe:nlu`, `probe:nlg` in a stream's retention list)."""


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
    format: str = "chat"
    """How log-likelihood scorers read a record: "chat" (the model's conversation format) or "plain" (raw text)."""
    lm_eval_task: str | None = None
    """For an `lm_eval:` retention entry: the lm-evaluation-harness task (a registered name or a YAML file)."""
    limit: int | None = None
    """Evaluate only the first N test records (a probe entry `probe:NAME:N`: a cheaper, coarser probe)."""
    train_parts: list[str] | None = None
    """Set by a stream entry `{task: DIR, train: [projectors]}`: only these parts learn during this task (on top of
    what the method trains), e.g. LLaVA stage 1 (projector alignment) as the first task of a stream."""
    train_lr: float | None = None
    """Set by a stream entry `{task: DIR, lr: 1e-3}`: this task's learning rate instead of train.lr (LLaVA's stage 1
    and stage 2 use different rates)."""

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
    choices: list[str] = field(default_factory=list)
    """Options of a multiple-choice record scored by log-likelihood (the answer is one of them)."""

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
    return read_yaml_mapping(path, DataError)


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
    if data.get("format", "chat") not in TEXT_FORMATS:
        raise DataError(f"{manifest}: format {data['format']!r} must be one of {', '.join(TEXT_FORMATS)}")
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
        format=str(data.get("format", "chat")),
    )


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
        good.append(Record(str(obj["id"]), obj["conversations"], [str(a) for a in answers], media, f"{path}:{lineno}",
                           list(obj.get("choices") or [])))
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
    reason = _check_choices(obj, task)
    if reason:
        return reason
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


def _check_choices(obj: dict, task: Task) -> str | None:
    """Why a record's multiple-choice options are unusable, or None (a loglik_choice task needs them)."""
    choices = obj.get("choices")
    if choices is None:
        return f"missing 'choices' (the task's scorer {CHOICE_SCORER} picks among them)" \
            if task.scorer == CHOICE_SCORER else None
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices) \
            or len(set(choices)) != len(choices):
        return "'choices' must be a list of at least two different non-empty strings"
    if obj["conversations"][-1]["value"] not in choices:
        return f"the answer {obj['conversations'][-1]['value']!r} is not one of the 'choices'"
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


def format_problems(problems: list[Problem], limit: int = 50) -> str:
    lines = [str(p) for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    return "\n".join(lines)

