"""Write the whole offline world (tasks, streams, world.json) to disk, deterministically from a seed.

Layout: tasks/<name>/{task.yaml, train.jsonl, test.jsonl, images/*.png | audio/*.wav | video/*.mov}; streams/image.yaml
(seven CoIN-like image tasks), streams/micl1.yaml and streams/micl2.yaml (P4's modality-inconsistent stream in its two
orders); world.json names the streams and the pre-training data (language skills; image, audio and video alignment).
Media are byte-stable: PNG without metadata, 16-bit PCM WAV, PNG-in-QuickTime clips with bitexact flags (clips.py).
With `speech=True` the audio tasks also carry words spoken by espeak-ng (speech.py), byte-stable per espeak-ng version.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml
from tqdm import tqdm

from .audio_tasks import AUDIO_ALIGN_TASK, AUDIO_TASKS, SPOKEN_WORDS, with_speech
from .clips import SUFFIX as CLIP_SUFFIX
from .clips import clip_bytes
from .image_tasks import ALIGN_TASK, MICL_IMAGE_TASKS, STREAM_TASKS
from .shapes import png_bytes
from .sounds import SAMPLE_RATE, wav_bytes
from .spec import TaskSpec
from .speech import ESPEAK, VOICE_ARGS, espeak_version, word_bank
from .text_tasks import text_tasks
from .video_tasks import VIDEO_ALIGN_TASK, VIDEO_TASKS

FORMAT = "mmcl-world"
VERSION = 6  # 2: audio and video tasks, the MICL streams; 3: 200 test records, richer alignment captions; 4: P1 stream;
# 5: mcq answered by the option's text, facts trained in both phrasings; 6: shape_cls draws larger shapes
DATA_VERSION = 5
"""The version of the task data itself: a world that only gains a stream keeps it, and so does a base model
pre-trained on it (`mmcl.builtin.builtin_model`)."""
STREAM_DESCRIPTION = "Seven image instruction tasks in the spirit of CoIN; language skills as retention tasks."
# P4's two task orders (AudioCaps, Flickr30k, MSVD-QA, Clotho-AQA, OK-VQA, MSR-VTT and the second permutation).
MICL_ORDERS: dict[str, tuple[str, ...]] = {
    "micl1": ("audio_cap", "image_cap", "video_qa", "audio_qa", "image_qa", "video_cap"),
    "micl2": ("image_cap", "video_cap", "video_qa", "image_qa", "audio_cap", "audio_qa"),
}
MICL_DESCRIPTION = ("Modality-inconsistent stream (P4, order {k}): image, audio and video captioning and QA; "
                    "language skills as retention tasks.")
MEDIA_DIRS = {"image": "images", "audio": "audio", "video": "video"}
P1_TASKS = ("image_cap", "image_qa", "ocr", "grounding")
"""P1's "Continual LLaVA" stage-2 tasks on the world: instruction following (captioning), VQA, OCR, referring."""
P1_DESCRIPTION = ("P1's LLaVA recipe as a continual stream: stage 1 (projector alignment on captions, projectors only, "
                  "lr 1e-3), then instruction following, VQA, OCR and grounding; real-text language probes as retention "
                  "(for a model with a real language model, e.g. model.path=small).")


@dataclass
class WorldSizes:
    """How many records each part of the world gets, and the image side in pixels.

    `train`/`test` size every stream task, image, audio and video alike (the MICL tasks included); the audio and
    video alignment sets get `align // 4` pairs each (the image alignment set `align`); video frames are
    `image_size` pixels square.
    """

    train: int = 192  # train records per stream task
    test: int = 200  # test records per task (stream tasks and retention tasks): one record is 0.5 points
    lang_train: int = 600  # train records per language skill (used for LM pre-training)
    align: int = 4800  # image-caption pairs for the vision tower and projector alignment (LLaVA stage 1)
    image_size: int = 64  # pixels (square PNG)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"WorldSizes.{f.name} must be a positive int, got {value!r}")
        if not 16 <= self.image_size <= 512:
            raise ValueError(f"WorldSizes.image_size must be between 16 and 512, got {self.image_size}")

    @property
    def media_align(self) -> int:
        """Alignment pairs for each of the audio and video towers."""
        return max(1, self.align // 4)


def _write_split(task_dir: Path, spec: TaskSpec, split: str, n: int, seed: int, image_size: int,
                 bar: tqdm, exclude: frozenset[str] = frozenset()) -> tuple[int, set[str]]:
    """Write one split file (and its media), skipping any sample whose prompt and media bytes are in `exclude` (so
    a test record never repeats a train record); return the longest gold answer in characters and the split's
    fingerprints."""
    rng = random.Random(f"mmcl-world/{seed}/{spec.name}/{split}")
    longest = 0
    lines: list[str] = []
    seen: set[str] = set()
    spare = 4 * n + 64 if exclude else n  # generators are lazy: spares are drawn only to replace skipped samples
    for sample in spec.generate(rng, spare, image_size):
        if len(lines) == n:
            break
        rec_id = f"{spec.name}-{split}-{len(lines):05d}"
        rec: dict = {"id": rec_id}
        human = sample.prompt
        media: tuple[str, str, bytes] | None = None
        if sample.image is not None:
            media = ("image", f"images/{rec_id}.png", png_bytes(sample.image))
        elif sample.audio is not None:
            media = ("audio", f"audio/{rec_id}.wav", wav_bytes(sample.audio, SAMPLE_RATE))
        elif sample.video is not None:
            media = ("video", f"video/{rec_id}{CLIP_SUFFIX}", clip_bytes(sample.video))
        fingerprint = hashlib.sha256(human.encode() + b"\0" + (media[2] if media else b"")).hexdigest()
        if fingerprint in exclude:
            continue
        seen.add(fingerprint)
        if media is not None:
            kind, rel, data = media
            (task_dir / rel).write_bytes(data)
            rec[kind] = rel
            human = f"<{kind}>\n" + human
        rec["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": sample.answer}]
        rec["answers"] = sample.answers or [sample.answer]
        lines.append(json.dumps(rec, ensure_ascii=False, sort_keys=False))
        longest = max(longest, len(sample.answer))
        bar.update(1)
    if len(lines) < n:
        raise ValueError(f"{spec.name}/{split}: only {len(lines)} of {n} records differ from the train split; "
                         "the task has too few distinct samples for these sizes")
    (task_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return longest, seen


def _write_task(root: Path, train: TaskSpec, test: TaskSpec, n_train: int, n_test: int, seed: int,
                image_size: int, bar: tqdm) -> str:
    """Write tasks/<name>/ (manifest, splits, images); return its path relative to `root`."""
    task_dir = root / "tasks" / train.name
    task_dir.mkdir(parents=True)
    if train.modality in MEDIA_DIRS:
        (task_dir / MEDIA_DIRS[train.modality]).mkdir()
    longest_train, train_prints = _write_split(task_dir, train, "train", n_train, seed, image_size, bar)
    # media tasks: a test record never repeats a train record; the language skills are memorised skills (all 155
    # single-digit sums are in training), tested on the trained questions (facts: in the second of two phrasings)
    exclude = frozenset(train_prints) if train.modality in MEDIA_DIRS else frozenset()
    longest_test, _ = _write_split(task_dir, test, "test", n_test, seed, image_size, bar, exclude)
    longest = max(longest_train, longest_test)
    manifest = {
        "name": train.name,
        "modality": train.modality,
        "type": train.type,
        "scorer": train.scorer,
        "description": train.description,
        "data_root": ".",
        "splits": {"train": "train.jsonl", "test": "test.jsonl"},
        # Characters bound tokens for any byte-level tokenizer, so this budget always fits the longest answer.
        "max_new_tokens": longest + 2,
    }
    _write_yaml(task_dir / "task.yaml", manifest)
    return f"tasks/{train.name}"


def _write_yaml(path: Path, data: dict) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=119), encoding="utf-8")


def _prepare_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"cannot write the world to {out}: it exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "world.json").is_file():
        raise ValueError(f"refusing to write the world into {out}: it is not empty and holds no world.json "
                         "(choose an empty or new directory)")


def _speech_tasks() -> tuple[tuple[TaskSpec, ...], TaskSpec, dict]:
    """The audio tasks and the audio alignment set with spoken words, and world.json's record of how they were
    spoken (the bytes reproduce only with the same espeak-ng version). Raises SpeechUnavailable without espeak-ng."""
    words = word_bank(SPOKEN_WORDS)
    meta = {"engine": ESPEAK, "version": espeak_version(), "voice": " ".join(VOICE_ARGS), "words": list(words)}
    return tuple(with_speech(s, words) for s in AUDIO_TASKS), with_speech(AUDIO_ALIGN_TASK, words), meta


def write_world(out: Path, seed: int = 0, sizes: WorldSizes | None = None, progress: bool = False,
                speech: bool = False) -> Path:
    """Write the offline world under `out` and return out/"world.json"; same seed and sizes give identical bytes.

    An existing world at `out` is replaced; any other non-empty directory is refused with a ValueError. `speech`
    mixes words spoken by espeak-ng into the audio tasks (speech.SpeechUnavailable if it is not installed); without
    it the world is numpy only and unchanged.
    """
    out = Path(out)
    sizes = sizes or WorldSizes()
    _prepare_target(out)
    audio_tasks, audio_align, speech_meta = _speech_tasks() if speech else (AUDIO_TASKS, AUDIO_ALIGN_TASK, None)
    micl_tasks = (*MICL_IMAGE_TASKS, *audio_tasks, *VIDEO_TASKS)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and swap in at the end, so an interrupted run never leaves a half world behind.
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    text = text_tasks(seed)
    media_align = (audio_align, VIDEO_ALIGN_TASK)
    total = ((len(STREAM_TASKS) + len(micl_tasks)) * (sizes.train + sizes.test)
             + len(text) * (sizes.lang_train + sizes.test) + sizes.align + sizes.test
             + len(media_align) * (sizes.media_align + sizes.test))
    try:
        with tqdm(total=total, desc="writing world", unit="rec", disable=not progress) as bar:
            stream = [_write_task(tmp, s, s, sizes.train, sizes.test, seed, sizes.image_size, bar)
                      for s in STREAM_TASKS]
            retention = [_write_task(tmp, tr, te, sizes.lang_train, sizes.test, seed, sizes.image_size, bar)
                         for tr, te in text]
            align = [_write_task(tmp, ALIGN_TASK, ALIGN_TASK, sizes.align, sizes.test, seed, sizes.image_size, bar)]
            align += [_write_task(tmp, s, s, sizes.media_align, sizes.test, seed, sizes.image_size, bar)
                      for s in media_align]
            micl = {s.name: _write_task(tmp, s, s, sizes.train, sizes.test, seed, sizes.image_size, bar)
                    for s in micl_tasks}
        (tmp / "streams").mkdir()
        _write_yaml(tmp / "streams" / "image.yaml", {
            "name": "image",
            "description": STREAM_DESCRIPTION,
            "tasks": [f"../{t}" for t in stream],
            "retention": [f"../{t}" for t in retention],
        })
        for name, order in MICL_ORDERS.items():
            _write_yaml(tmp / "streams" / f"{name}.yaml", {
                "name": name,
                "description": MICL_DESCRIPTION.format(k=name[-1]),
                "tasks": [f"../{micl[t]}" for t in order],
                "retention": [f"../{t}" for t in retention],
            })
        by_name = {Path(t).name: t for t in [*stream, *micl.values()]}
        _write_yaml(tmp / "streams" / "p1.yaml", {
            "name": "p1",
            "description": P1_DESCRIPTION,
            "tasks": [{"task": f"../{align[0]}", "train": ["projectors"], "lr": 1.0e-3},
                      *[f"../{by_name[t]}" for t in P1_TASKS]],
            "retention": ["probe:nlu:200", "probe:nlg"],
        })
        world = {
            "format": FORMAT,
            "version": VERSION,
            "data_version": DATA_VERSION,
            "seed": seed,
            "sizes": asdict(sizes),
            "streams": {"image": "streams/image.yaml", **{k: f"streams/{k}.yaml" for k in MICL_ORDERS},
                        "p1": "streams/p1.yaml"},
            "pretrain": {"text": retention, "align": align},
        }
        if speech_meta:  # only then, so a world without speech is byte-identical to one written before the option
            world["speech"] = speech_meta
        (tmp / "world.json").write_text(json.dumps(world, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out / "world.json"


def task_dirs(world_dir: Path) -> list[Path]:
    """Every task directory of a written world: its streams' tasks and retention tasks, then its pre-training sets."""
    world = json.loads((world_dir / "world.json").read_text(encoding="utf-8"))
    dirs: list[Path] = []
    for stream_rel in world["streams"].values():
        stream_file = world_dir / stream_rel
        stream = yaml.safe_load(stream_file.read_text(encoding="utf-8"))
        entries = [t["task"] if isinstance(t, dict) else t for t in stream["tasks"] + stream.get("retention", [])]
        dirs += [(stream_file.parent / t).resolve() for t in entries if ":" not in t]  # not probe:/lm_eval: entries
    for group in world["pretrain"].values():
        dirs += [(world_dir / t).resolve() for t in group]
    return list(dict.fromkeys(dirs))


def world_texts(out: Path) -> Iterator[str]:
    """Yield every human and gpt text (and every extra reference answer) of every split of every task in the world.

    Meant for training the tokenizer, so it covers all words the model must read or write; texts keep <image>.
    """
    for task_dir in task_dirs(Path(out)):
        manifest = yaml.safe_load((task_dir / "task.yaml").read_text(encoding="utf-8"))
        for split_file in manifest["splits"].values():
            with open(task_dir / split_file, encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line)
                    texts = [turn["value"] for turn in rec["conversations"]]
                    yield from texts
                    yield from (a for a in rec.get("answers", []) if a not in texts)
