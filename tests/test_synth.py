"""Tests of the built-in offline world generator (mmcl.data.synth)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mmcl.data.synth import WorldSizes, world_texts, write_world
from mmcl.data.synth.shapes import BACKGROUNDS
from mmcl.data.synth.text_tasks import FACT_TEMPLATES, knowledge_base

SMALL = WorldSizes(train=8, test=8, lang_train=12, align=6, image_size=32)
STREAM = ["color_qa", "shape_cls", "count", "ocr", "mcq", "grounding", "caption"]
RETENTION = ["lang_arith", "lang_facts", "lang_order"]
ALL_TASKS = STREAM + RETENTION + ["align"]
MANIFEST_KEYS = ["name", "modality", "type", "scorer", "description", "data_root", "splits", "max_new_tokens"]
SCORERS = {"exact_match", "vqa_accuracy", "option_letter", "box_iou", "cider", "classification"}
TYPES = {"qa", "mcq", "caption", "grounding", "classification"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("w") / "world"
    write_world(out, seed=3, sizes=SMALL)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _records(world: Path, task: str, split: str) -> list[dict]:
    lines = (world / "tasks" / task / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _iou(a: list[float], b: list[float]) -> float:
    iw, ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0])), max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_same_seed_gives_identical_bytes(world: Path, tmp_path: Path) -> None:
    again = write_world(tmp_path / "again", seed=3, sizes=SMALL).parent
    first, second = _files(world), _files(again)
    assert sorted(first) == sorted(second)
    assert len(first) > 100
    assert [k for k in first if first[k] != second[k]] == []


def test_different_seed_differs(world: Path, tmp_path: Path) -> None:
    other = _files(write_world(tmp_path / "other", seed=4, sizes=SMALL).parent)
    first = _files(world)
    changed = [k for k in first if first[k] != other.get(k)]
    assert any(k.endswith(".png") for k in changed)
    assert any(k.endswith(".jsonl") for k in changed)


def test_world_json_and_stream(world: Path) -> None:
    meta = json.loads((world / "world.json").read_text(encoding="utf-8"))
    assert meta["format"] == "mmcl-world" and (meta["version"], meta["data_version"], meta["seed"]) == (6, 5, 3)
    assert meta["sizes"] == {"train": 8, "test": 8, "lang_train": 12, "align": 6, "image_size": 32}
    assert meta["pretrain"] == {"text": [f"tasks/{t}" for t in RETENTION],
                                "align": ["tasks/align", "tasks/align_audio", "tasks/align_video"]}
    assert list(meta["streams"]) == ["image", "micl1", "micl2", "p1"]
    stream_file = world / meta["streams"]["image"]
    stream = yaml.safe_load(stream_file.read_text(encoding="utf-8"))
    assert stream["name"] == "image"
    assert [Path(t).name for t in stream["tasks"]] == STREAM
    assert [Path(t).name for t in stream["retention"]] == RETENTION
    for rel in stream["tasks"] + stream["retention"]:
        assert (stream_file.parent / rel / "task.yaml").is_file(), rel


def test_p1_stream_is_stage_1_then_four_stage_2_tasks_with_the_language_probes(world: Path) -> None:
    from mmcl.data.streams import load_stream

    p1 = load_stream(world / "streams" / "p1.yaml")
    assert [t.name for t in p1.tasks] == ["align", "image_cap", "image_qa", "ocr", "grounding"]
    assert (p1.tasks[0].train_parts, p1.tasks[0].train_lr) == (["projectors"], 1e-3)
    assert all(t.train_parts is None and t.train_lr is None for t in p1.tasks[1:])
    assert [t.name for t in p1.retention] == ["probe-nlu-200", "probe-nlg"]


@pytest.mark.parametrize("task", ALL_TASKS)
def test_manifest(world: Path, task: str) -> None:
    manifest = yaml.safe_load((world / "tasks" / task / "task.yaml").read_text(encoding="utf-8"))
    assert list(manifest) == MANIFEST_KEYS
    assert manifest["name"] == task
    assert manifest["modality"] == ("text" if task.startswith("lang_") else "image")
    assert manifest["type"] in TYPES and manifest["scorer"] in SCORERS
    assert manifest["data_root"] == "."
    assert manifest["splits"] == {"train": "train.jsonl", "test": "test.jsonl"}
    longest = max(len(r["conversations"][1]["value"]) for s in ("train", "test") for r in _records(world, task, s))
    assert manifest["max_new_tokens"] >= longest + 2


@pytest.mark.parametrize("task", ALL_TASKS)
def test_records(world: Path, task: str) -> None:
    is_text = task.startswith("lang_")
    n_train = SMALL.lang_train if is_text else SMALL.align if task == "align" else SMALL.train
    ids = set()
    for split, n in (("train", n_train), ("test", SMALL.test)):
        recs = _records(world, task, split)
        assert len(recs) == n
        for rec in recs:
            assert list(rec) == (["id", "conversations", "answers"] if is_text else
                                 ["id", "image", "conversations", "answers"])
            ids.add(rec["id"])
            human, gpt = rec["conversations"]
            assert (human["from"], gpt["from"]) == ("human", "gpt")
            assert human["value"] and gpt["value"]
            assert rec["answers"] and all(isinstance(a, str) and a for a in rec["answers"])
            if task != "mcq":  # mcq: the answer is the option's text, the reference its letter (tested below)
                assert gpt["value"] == rec["answers"][0]
            texts = human["value"] + gpt["value"] + " ".join(rec["answers"])
            if is_text:
                assert "<image>" not in texts
            else:
                assert texts.count("<image>") == 1 and human["value"].startswith("<image>\n")
                with Image.open(world / "tasks" / task / rec["image"]) as img:
                    assert img.format == "PNG" and img.size == (SMALL.image_size, SMALL.image_size)
    assert len(ids) == n_train + SMALL.test


def test_answer_lists(world: Path) -> None:
    for rec in _records(world, "count", "test"):
        assert len(rec["answers"]) == 10
        assert rec["answers"].count(rec["conversations"][1]["value"]) >= 8
    for rec in _records(world, "caption", "test"):
        assert len(set(rec["answers"])) == 3


def test_grounding_boxes_match_drawn_shape(world: Path) -> None:
    bg = np.array(BACKGROUNDS)
    for split in ("train", "test"):
        for rec in _records(world, "grounding", split):
            box = json.loads(rec["conversations"][1]["value"])
            assert len(box) == 4 and all(0.0 <= v <= 1.0 for v in box)
            assert box[0] < box[2] and box[1] < box[3]
            pix = np.asarray(Image.open(world / "tasks" / "grounding" / rec["image"]).convert("RGB"))
            shape = ~(pix[:, :, None, :] == bg[None, None]).all(-1).any(-1)
            ys, xs = np.nonzero(shape)
            size = SMALL.image_size
            true = [xs.min() / size, ys.min() / size, (xs.max() + 1) / size, (ys.max() + 1) / size]
            assert _iou(box, true) >= 0.7, (rec["id"], box, true)


def test_shape_classes_are_drawn_65_to_90_percent_of_the_image_wide(world: Path) -> None:
    bg = np.array(BACKGROUNDS)
    widths = []
    for split in ("train", "test"):
        for rec in _records(world, "shape_cls", split):
            pix = np.asarray(Image.open(world / "tasks" / "shape_cls" / rec["image"]).convert("RGB"))
            ys, xs = np.nonzero(~(pix[:, :, None, :] == bg[None, None]).all(-1).any(-1))
            widths.append(max(xs.max() - xs.min(), ys.max() - ys.min()) + 1)
    # box sides are drawn from round(0.65 * 32) = 21 to round(0.9 * 32) = 29 pixels; a shape fills its box
    assert SMALL.image_size == 32 and 21 <= min(widths) and max(widths) <= 29, (min(widths), max(widths))
    assert max(widths) - min(widths) >= 4  # sizes still vary


def test_mcq_answers_the_gold_options_text_and_gold_letters_cover_all_options(world: Path) -> None:
    """The trained answer is the gold option's text, the reference its letter; gold letters cover A-D."""
    for split in ("train", "test"):
        letters = set()
        for rec in _records(world, "mcq", split):
            (gold,) = rec["answers"]
            options = re.findall(r"^([A-D])\. (\w+)$", rec["conversations"][0]["value"], flags=re.M)
            assert [o[0] for o in options] == list("ABCD")
            assert len({o[1] for o in options}) == 4
            assert rec["conversations"][1]["value"] == dict(options)[gold]
            letters.add(gold)
        assert letters == set("ABCD")


def test_language_answers_are_correct(world: Path) -> None:
    for rec in _records(world, "lang_arith", "train") + _records(world, "lang_arith", "test"):
        a, op, b = re.fullmatch(r"What is (\d) (plus|minus) (\d)\?", rec["conversations"][0]["value"]).groups()
        result = int(a) + int(b) if op == "plus" else int(a) - int(b)
        assert result >= 0 and rec["conversations"][1]["value"] == str(result)
    for rec in _records(world, "lang_order", "test"):
        words = rec["conversations"][0]["value"].removeprefix("Reverse the words: ").split()
        assert 2 <= len(words) <= 4 and rec["conversations"][1]["value"] == " ".join(reversed(words))
    kb = knowledge_base(3)
    # question -> (phrasing, its true answer); training asks both phrasings, the test the second
    truth = {t[k].format(name=n): (k, kb[n][a]) for a, t in FACT_TEMPLATES.items() for n in kb for k in (0, 1)}
    for split, phrasings in (("train", {0, 1}), ("test", {1})):
        records = _records(world, "lang_facts", split)
        assert {truth[r["conversations"][0]["value"]][0] for r in records} == phrasings
        assert all(r["conversations"][1]["value"] == truth[r["conversations"][0]["value"]][1] for r in records)


def test_knowledge_base_depends_on_seed() -> None:
    assert len(knowledge_base(0)) == 30
    assert knowledge_base(0) == knowledge_base(0)
    assert knowledge_base(0) != knowledge_base(1)


def test_world_texts_cover_every_turn_with_small_vocabulary(world: Path) -> None:
    texts = list(world_texts(world))
    assert all(isinstance(t, str) and t for t in texts)
    for task in ALL_TASKS:
        for rec in _records(world, task, "test"):
            assert rec["conversations"][0]["value"] in texts and rec["conversations"][1]["value"] in texts
    words = {w for t in texts for w in t.split()}
    assert 50 < len(words) < 400


def test_refuses_non_empty_foreign_dir(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        write_world(tmp_path, sizes=SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_rewrites_existing_world_and_accepts_empty_dir(tmp_path: Path) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    write_world(target, seed=0, sizes=SMALL)
    before = _files(target)
    (target / "tasks" / "stale.txt").write_text("old")
    assert write_world(target, seed=0, sizes=SMALL) == target / "world.json"
    assert _files(target) == before


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"train": 0}, "train must be a positive int"),
    ({"test": -1}, "test must be a positive int"),
    ({"lang_train": 2.5}, "lang_train must be a positive int"),
    ({"align": True}, "align must be a positive int"),
    ({"image_size": 8}, "image_size must be between 16 and 512"),
    ({"image_size": 513}, "image_size must be between 16 and 512"),
])
def test_sizes_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorldSizes(**kwargs)


MEDIA_TASKS = {"image_cap": "image", "image_qa": "image", "audio_cap": "audio", "audio_qa": "audio",
               "video_cap": "video", "video_qa": "video", "align_audio": "audio", "align_video": "video"}


@pytest.mark.parametrize("task", sorted(MEDIA_TASKS))
def test_audio_video_and_micl_image_tasks(world: Path, task: str) -> None:
    modality = MEDIA_TASKS[task]
    manifest = yaml.safe_load((world / "tasks" / task / "task.yaml").read_text(encoding="utf-8"))
    assert list(manifest) == MANIFEST_KEYS and manifest["name"] == task and manifest["modality"] == modality
    assert manifest["type"] == ("caption" if "cap" in task or "align" in task else "qa")
    assert manifest["scorer"] == ("cider" if manifest["type"] == "caption" else "exact_match")
    n_train = max(1, SMALL.align // 4) if task.startswith("align") else SMALL.train
    suffix = {"image": ".png", "audio": ".wav", "video": ".mov"}[modality]
    for split, n in (("train", n_train), ("test", SMALL.test)):
        recs = _records(world, task, split)
        assert len(recs) == n
        for rec in recs:
            assert list(rec) == ["id", modality, "conversations", "answers"]
            assert rec[modality].endswith(suffix) and (world / "tasks" / task / rec[modality]).is_file()
            human, gpt = rec["conversations"]
            assert human["value"].startswith(f"<{modality}>\n") and gpt["value"] == rec["answers"][0]
            assert manifest["max_new_tokens"] >= len(gpt["value"]) + 2


def test_micl_caption_answers_name_what_was_generated(world: Path) -> None:
    for rec in _records(world, "audio_cap", "train") + _records(world, "audio_cap", "test"):
        words = rec["answers"][0].split()
        assert words[0] in ("one", "two", "three") and words[1] in ("low", "medium", "high")
        assert words[2] in ("sine", "square", "sawtooth") and words[3] == ("beep" if words[0] == "one" else "beeps")
        assert len(set(rec["answers"])) == 3
    for rec in _records(world, "video_cap", "test"):
        assert re.fullmatch(r"a \w+ \w+ (moving (to the left|to the right|up|down)|growing|shrinking|turning \w+)",
                            rec["answers"][0]), rec["answers"][0]


def test_default_sizes_score_each_record_at_most_half_a_point() -> None:
    assert WorldSizes().test >= 200


def _fingerprints(world: Path, task: str, split: str) -> set[tuple[str, bytes]]:
    out = set()
    for rec in _records(world, task, split):
        media = next((rec[k] for k in ("image", "audio", "video") if k in rec), None)
        data = (world / "tasks" / task / media).read_bytes() if media else b""
        out.add((rec["conversations"][0]["value"], data))
    return out


@pytest.mark.parametrize("task", STREAM + sorted(t for t in MEDIA_TASKS if not t.startswith("align")))
def test_no_test_record_repeats_a_train_record(world: Path, task: str) -> None:
    """A test record never shows the same prompt with the same media bytes as a train record of its task."""
    assert _fingerprints(world, task, "test").isdisjoint(_fingerprints(world, task, "train"))


def test_alignment_captions_name_counts_words_and_boxes(world: Path, tmp_path: Path) -> None:
    """The alignment set holds every kind of caption, and what a caption says is what the image shows."""
    out = write_world(tmp_path / "w", seed=5, sizes=WorldSizes(train=1, test=1, lang_train=1, align=40,
                                                               image_size=32)).parent
    recs = _records(out, "align", "train")
    captions = [r["conversations"][1]["value"] for r in recs]
    assert sum(c.startswith(("one ", "two ", "three ", "four ")) for c in captions) == 10
    assert sum(c.startswith("the word ") for c in captions) == 10
    assert sum("[" in c for c in captions) == 10
    bg = np.array(BACKGROUNDS)
    for rec, cap in zip(recs, captions):
        pix = np.asarray(Image.open(out / "tasks" / "align" / rec["image"]).convert("RGB"))
        ink = ~(pix[:, :, None, :] == bg[None, None]).all(-1).any(-1)
        if "[" in cap:  # a grounded caption: its box is the drawn shape's extent
            box = json.loads(cap[cap.index("["):])
            ys, xs = np.nonzero(ink)
            true = [xs.min() / 32, ys.min() / 32, (xs.max() + 1) / 32, (ys.max() + 1) / 32]
            assert _iou(box, true) >= 0.7, (cap, true)
        elif cap.startswith(("one ", "two ", "three ", "four ")):  # shapes sit in distinct cells of a 3x3 grid
            n = ("one", "two", "three", "four").index(cap.split()[0]) + 1
            ys, xs = np.nonzero(ink)
            assert len({(y // (32 // 3), x // (32 // 3)) for y, x in zip(ys, xs)}) == n, cap


def test_test_split_skips_samples_equal_to_train_samples(tmp_path: Path) -> None:
    """OCR at 16 px has few distinct images, so a test draw repeats train images; the world skips those samples."""
    from tqdm import tqdm

    from mmcl.data.synth.image_tasks import STREAM_TASKS
    from mmcl.data.synth.world import _write_split

    ocr = next(s for s in STREAM_TASKS if s.name == "ocr")
    (tmp_path / "images").mkdir()
    with tqdm(disable=True) as bar:
        _, train = _write_split(tmp_path, ocr, "train", 40, 0, 16, bar)
        _, plain = _write_split(tmp_path, ocr, "test", 40, 0, 16, bar)
        assert plain & train  # the draw does repeat train samples
        _, kept = _write_split(tmp_path, ocr, "test", 40, 0, 16, bar, frozenset(train))
    assert kept and not kept & train
    assert len((tmp_path / "test.jsonl").read_text(encoding="utf-8").splitlines()) == 40


def test_every_test_split_is_full_at_default_test_and_language_sizes(tmp_path: Path) -> None:
    """The language skills keep their trained questions (all 155 sums are in a 600-record train split), so excluding
    train records there would empty the arithmetic test split; every split has its 200 records."""
    out = write_world(tmp_path / "w", seed=1, sizes=WorldSizes(train=2, test=200, lang_train=600, align=4,
                                                               image_size=16)).parent
    for task_dir in sorted((out / "tasks").iterdir()):
        assert len(_records(out, task_dir.name, "test")) == 200, task_dir.name
