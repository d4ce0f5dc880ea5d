"""Dataset adapters: tiny copies of each published layout convert into valid mmcl tasks (no downloads)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mmcl.data.records import PLACEHOLDER, load_task, read_records
from mmcl.data.sources import SourceError, convert, list_sources, write_stream
from mmcl.data.streams import load_stream, validate_path

SHORT = "Answer the question using a single word or phrase."


# -- tiny media ---------------------------------------------------------------------------------------------------


def _jpg(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, "JPEG")


def _wav(path: Path) -> None:
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(1600) / 16000
    soundfile.write(str(path), (0.1 * np.sin(2 * np.pi * 440 * t)).astype("float32"), 16000)


def _clip(fmt: str, codec: str) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=4)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        for i in range(4):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 60 * i, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    return {"mp4": _clip("mp4", "libx264"), "avi": _clip("avi", "mpeg4")}


def _write(path: Path, data: bytes | str | object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_text(json.dumps(data), encoding="utf-8")


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


# -- checks shared by every dataset -------------------------------------------------------------------------------


def _check(task_dir: Path, modality: str, scorer: str, splits: list[str]) -> dict[str, dict[str, dict]]:
    """Every record valid (media present and decodable); placeholder and media key match the modality; returns the
    raw records by split and id."""
    task = load_task(task_dir)
    assert task.modality == modality and task.scorer == scorer
    assert sorted(task.splits) == sorted(splits)
    out = {}
    for split in splits:
        good, problems = read_records(task, split)
        assert problems == [], problems
        raw = [json.loads(line) for line in task.split_path(split).read_text().splitlines()]
        assert len(good) == len(raw) > 0
        for rec, r in zip(raw, good):
            assert set(r.media) == {modality}
            others = [m for m in PLACEHOLDER if m != modality]
            assert not any(m in rec for m in others)
            human = rec["conversations"][0]["value"]
            assert human.startswith(PLACEHOLDER[modality] + "\n") and human.count(PLACEHOLDER[modality]) == 1
            assert rec["id"].startswith(f"{task.name}-{split}-")
            assert rec["conversations"][1]["value"] in rec["answers"]
        out[split] = {rec["id"]: rec for rec in raw}
    n, problems = validate_path(task_dir)
    assert problems == [] and n == sum(len(v) for v in out.values())
    return out


def _reconvert_same(name: str, src: Path, out: Path, first: dict) -> None:
    """Converting again gives the same ids (and records)."""
    (task_dir,) = convert(name, src, out / "again")
    for split, recs in first.items():
        again = [json.loads(line) for line in (task_dir / f"{split}.jsonl").read_text().splitlines()]
        assert {r["id"]: r for r in again} == recs


def test_list_sources():
    assert list_sources() == ["flickr30k", "okvqa", "audiocaps", "clotho_aqa", "msrvtt", "msvd_qa"]
    with pytest.raises(SourceError, match="unknown dataset 'coco'.*flickr30k"):
        convert("coco", Path("."), Path("."))


# -- Flickr30k ----------------------------------------------------------------------------------------------------


def _flickr(src: Path) -> None:
    images = []
    for k, split in enumerate(["train", "train", "train", "val", "val", "test", "test"]):
        fn = f"{1000 + k}.jpg"
        _jpg(src / "flickr30k-images" / fn)
        sents = [{"raw": f"caption {j} of image {k} .", "tokens": []} for j in range(5)]
        images.append({"filename": fn, "imgid": k, "split": split, "sentences": sents, "sentids": []})
    _write(src / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})


def test_flickr30k(tmp_path):
    src = tmp_path / "flickr30k"
    _flickr(src)
    (task_dir,) = convert("flickr30k", src, tmp_path / "out")
    assert task_dir == tmp_path / "out" / "flickr30k"
    recs = _check(task_dir, "image", "cider", ["train", "val", "test"])
    rec = recs["train"]["flickr30k-train-1000"]
    assert rec["image"] == "1000.jpg"
    assert rec["conversations"][0]["value"] == "<image>\nDescribe the image briefly."
    assert rec["answers"] == [f"caption {j} of image 0 ." for j in range(5)]
    assert rec["conversations"][1]["value"] == rec["answers"][0]
    assert len(recs["train"]) == 3 and len(recs["val"]) == 2 and len(recs["test"]) == 2
    assert load_task(task_dir).data_root == (src / "flickr30k-images").resolve()
    _reconvert_same("flickr30k", src, tmp_path, recs)


def test_flickr30k_splits_limit_and_missing_media(tmp_path, capsys):
    src = tmp_path / "flickr30k"
    _flickr(src)
    (src / "flickr30k-images" / "1001.jpg").unlink()
    (task_dir,) = convert("flickr30k", src, tmp_path / "out", splits=["train"], limit=2)
    assert "1 of 2 image files not found" in capsys.readouterr().err
    task = load_task(task_dir)
    assert list(task.splits) == ["train"]
    good, problems = read_records(task, "train")
    assert [r.id for r in good] == ["flickr30k-train-1000"]
    assert len(problems) == 1 and "image file not found" in problems[0].reason
    with pytest.raises(SourceError, match="unknown split"):
        convert("flickr30k", src, tmp_path / "out", splits=["dev"])


def test_flickr30k_missing_file(tmp_path):
    (tmp_path / "flickr30k-images").mkdir()
    with pytest.raises(SourceError, match=r"flickr30k: .*dataset_flickr30k\.json not found; expected layout"):
        convert("flickr30k", tmp_path, tmp_path / "out")


# -- OK-VQA -------------------------------------------------------------------------------------------------------


def _okvqa(src: Path) -> None:
    for coco, ids in (("train2014", [9, 25, 30]), ("val2014", [73, 74])):
        qs, anns = [], []
        for k, image_id in enumerate(ids):
            qid = image_id * 10 + k
            _jpg(src / coco / f"COCO_{coco}_{image_id:012d}.jpg")
            qs.append({"image_id": image_id, "question": f"What is thing {k}?", "question_id": qid})
            answers = ["cat"] * 3 + ["dog"] * 6 + ["cow"]
            anns.append({"image_id": image_id, "question_id": qid, "question_type": "other", "answer_type": "other",
                         "answers": [{"answer": a, "raw_answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                     for j, a in enumerate(answers)]})
        _write(src / f"OpenEnded_mscoco_{coco}_questions.json", {"questions": qs})
        _write(src / f"mscoco_{coco}_annotations.json", {"annotations": anns})


def test_okvqa(tmp_path):
    src = tmp_path / "okvqa"
    _okvqa(src)
    (task_dir,) = convert("ok-vqa", src, tmp_path / "out")
    recs = _check(task_dir, "image", "vqa_accuracy", ["train", "test"])
    rec = recs["test"]["okvqa-test-730"]
    assert rec["image"] == "val2014/COCO_val2014_000000000073.jpg"
    assert rec["conversations"][0]["value"] == f"<image>\nWhat is thing 0?\n{SHORT}"
    assert len(rec["answers"]) == 10 and rec["conversations"][1]["value"] == "dog"
    assert len(recs["train"]) == 3 and len(recs["test"]) == 2
    _reconvert_same("okvqa", src, tmp_path, recs)


def test_okvqa_missing_file(tmp_path):
    src = tmp_path / "okvqa"
    _okvqa(src)
    (src / "mscoco_val2014_annotations.json").unlink()
    with pytest.raises(SourceError, match=r"okvqa: .*mscoco_val2014_annotations\.json not found; expected layout"):
        convert("okvqa", src, tmp_path / "out", splits=["test"])
    # By default a split whose files are absent is skipped (and noted); the others are written.
    (task_dir,) = convert("okvqa", src, tmp_path / "out")
    assert list(load_task(task_dir).splits) == ["train"]
    for f in src.glob("*train2014*.json"):
        f.unlink()
    with pytest.raises(SourceError, match=r"okvqa: none of the split files found"):
        convert("okvqa", src, tmp_path / "out")


# -- AudioCaps ----------------------------------------------------------------------------------------------------


def _audiocaps(src: Path) -> None:
    header = ["audiocap_id", "youtube_id", "start_time", "caption"]
    _csv(src / "train.csv", header, [[91139, "r1nicOVtvkQ", 130, "A woman talks"], [58146, "UDGBjjwyaqE", 20, "Rain"]])
    for split, base in (("val", 100), ("test", 200)):
        rows = [[base + j, "aBcD_-123", 30, f"clip one caption {j}"] for j in range(5)]
        rows += [[base + 10 + j, "xYz987", 0, f"clip two caption {j}"] for j in range(5)]
        _csv(src / f"{split}.csv", header, rows)
    _wav(src / "audio" / "train" / "r1nicOVtvkQ.wav")
    _wav(src / "audio" / "train" / "58146.wav")  # named by audiocap_id
    for split, base in (("val", 100), ("test", 200)):
        _wav(src / "audio" / split / "aBcD_-123.wav")
        _wav(src / "audio" / split / f"{base + 12}.wav")  # any caption's audiocap_id names the clip


def test_audiocaps(tmp_path):
    src = tmp_path / "audiocaps"
    _audiocaps(src)
    (task_dir,) = convert("audiocaps", src, tmp_path / "out")
    recs = _check(task_dir, "audio", "cider", ["train", "val", "test"])
    assert recs["train"]["audiocaps-train-UDGBjjwyaqE_20"]["audio"] == "train/58146.wav"
    rec = recs["val"]["audiocaps-val-aBcD_-123_30"]
    assert rec["audio"] == "val/aBcD_-123.wav"
    assert rec["conversations"][0]["value"] == "<audio>\nDescribe the audio briefly."
    assert rec["answers"] == [f"clip one caption {j}" for j in range(5)]
    assert rec["conversations"][1]["value"] == "clip one caption 0"
    assert recs["test"]["audiocaps-test-xYz987_0"]["audio"] == "test/212.wav"
    assert [len(recs[s]) for s in ("train", "val", "test")] == [2, 2, 2]
    assert load_task(task_dir).data_root == (src / "audio").resolve()
    _reconvert_same("audiocaps", src, tmp_path, recs)


def test_audiocaps_missing_file(tmp_path):
    src = tmp_path / "audiocaps"
    _audiocaps(src)
    (src / "val.csv").unlink()
    with pytest.raises(SourceError, match=r"audiocaps: .*val\.csv not found; expected layout:\nSRC/"):
        convert("audiocaps", src, tmp_path / "out", splits=["train", "val"])


# -- Clotho-AQA ---------------------------------------------------------------------------------------------------


def _clotho(src: Path) -> None:
    header = ["file_name", "QuestionText", "answer", "confidence"]
    for split in ("train", "val", "test"):
        rows = []
        for f in (f"{split} bird song.wav", f"{split}_rain.wav"):
            _wav(src / "audio_files" / f)
            rows += [[f, "Is it raining?", a, c] for a, c in (("no", "yes"), ("yes", "maybe"), ("no", "no"))]
            rows += [[f, "What animal is heard?", a, "yes"] for a in ("bird", "dog", "bird")]
        _csv(src / f"clotho_aqa_{split}.csv", header, rows)


def test_clotho_aqa(tmp_path):
    src = tmp_path / "clotho"
    _clotho(src)
    (task_dir,) = convert("clotho-aqa", src, tmp_path / "out")
    recs = _check(task_dir, "audio", "exact_match", ["train", "val", "test"])
    assert all(len(v) == 4 for v in recs.values())
    rec = next(r for r in recs["val"].values() if r["audio"] == "val bird song.wav"
               and "raining" in r["conversations"][0]["value"])
    assert rec["conversations"][0]["value"] == f"<audio>\nIs it raining?\n{SHORT}"
    assert rec["answers"] == ["no", "yes", "no"] and rec["conversations"][1]["value"] == "no"
    assert rec["id"].startswith("clotho_aqa-val-val bird song-")
    _reconvert_same("clotho_aqa", src, tmp_path, recs)


def test_clotho_aqa_missing_file(tmp_path):
    (tmp_path / "audio_files").mkdir()
    with pytest.raises(SourceError, match=r"clotho_aqa: none of the split files found .*clotho_aqa_test\.csv"):
        convert("clotho_aqa", tmp_path, tmp_path / "out")
    _csv(tmp_path / "clotho_aqa_train.csv", ["file_name", "Question"], [["a.wav", "Why?"]])
    with pytest.raises(SourceError, match=r"clotho_aqa_train\.csv lacks column\(s\) QuestionText, answer"):
        convert("clotho_aqa", tmp_path, tmp_path / "out")


# -- MSR-VTT ------------------------------------------------------------------------------------------------------


def _msrvtt_info(splits: list[tuple[int, str]]) -> dict:
    return {
        "videos": [{"video_id": f"video{i}", "split": s, "category": 0, "id": i} for i, s in splits],
        "sentences": [{"video_id": f"video{i}", "caption": f"video {i} caption {j}", "sen_id": 20 * i + j}
                      for i, _ in splits for j in range(3)],
    }


def test_msrvtt_data_json(tmp_path, clips):
    src = tmp_path / "msrvtt"
    splits = [(0, "train"), (1, "train"), (2, "validate"), (3, "test"), (4, "test")]
    _write(src / "MSRVTT_data.json", _msrvtt_info(splits))
    for i, _ in splits:
        _write(src / "videos" / "all" / f"video{i}.mp4", clips["mp4"])
    (task_dir,) = convert("msrvtt", src, tmp_path / "out")
    recs = _check(task_dir, "video", "cider", ["train", "val", "test"])
    rec = recs["val"]["msrvtt-val-video2"]
    assert rec["video"] == "video2.mp4"
    assert rec["conversations"][0]["value"] == "<video>\nDescribe the video briefly."
    assert rec["answers"] == [f"video 2 caption {j}" for j in range(3)]
    assert rec["conversations"][1]["value"] == "video 2 caption 0"
    _reconvert_same("msrvtt", src, tmp_path, recs)


def test_msrvtt_challenge_layout(tmp_path, clips):
    src = tmp_path / "msrvtt"
    _write(src / "train_val_videodatainfo.json", _msrvtt_info([(0, "train"), (1, "validate")]))
    _write(src / "test_videodatainfo.json", _msrvtt_info([(7010, "test")]))
    for i in (0, 1):
        _write(src / "TrainValVideo" / f"video{i}.mp4", clips["mp4"])
    _write(src / "TestVideo" / "video7010.mp4", clips["mp4"])
    (task_dir,) = convert("msrvtt", src, tmp_path / "out")
    recs = _check(task_dir, "video", "cider", ["train", "val", "test"])
    assert recs["test"]["msrvtt-test-video7010"]["video"] == "TestVideo/video7010.mp4"
    assert recs["train"]["msrvtt-train-video0"]["video"] == "TrainValVideo/video0.mp4"
    assert load_task(task_dir).data_root == src.resolve()


def test_msrvtt_missing_file(tmp_path):
    (tmp_path / "videos" / "all").mkdir(parents=True)
    with pytest.raises(SourceError, match=r"msrvtt: .*MSRVTT_data\.json not found .*; expected layout"):
        convert("msrvtt", tmp_path, tmp_path / "out")
    _write(tmp_path / "MSRVTT_data.json", _msrvtt_info([(0, "train")]))
    (tmp_path / "videos" / "all").rmdir()
    with pytest.raises(SourceError, match=r"msrvtt: .*videos/all not found"):
        convert("msrvtt", tmp_path, tmp_path / "out")


# -- MSVD-QA ------------------------------------------------------------------------------------------------------


def _msvd_entries(split: str, base: int) -> list[dict]:
    return [{"answer": "man", "id": base, "question": "who is cooking?", "video_id": 1},
            {"answer": "dance", "id": base + 1, "question": "what are the people doing?", "video_id": 2}]


def test_msvd_qa_mapping_layout(tmp_path, clips):
    src = tmp_path / "msvd"
    for k, split in enumerate(("train", "val", "test")):
        _write(src / f"{split}_qa.json", _msvd_entries(split, 100 * k))
    _write(src / "youtube_mapping.txt", "-4wsuPCjDBc_5_15 vid1\nzv2RIbUsnSw_159_170 vid2\n")
    for name in ("-4wsuPCjDBc_5_15", "zv2RIbUsnSw_159_170"):
        _write(src / "YouTubeClips" / f"{name}.avi", clips["avi"])
    (task_dir,) = convert("msvd_qa", src, tmp_path / "out")
    recs = _check(task_dir, "video", "exact_match", ["train", "val", "test"])
    rec = recs["test"]["msvd_qa-test-200"]
    assert rec["video"] == "-4wsuPCjDBc_5_15.avi"
    assert rec["conversations"][0]["value"] == f"<video>\nwho is cooking?\n{SHORT}"
    assert rec["answers"] == ["man"] and rec["conversations"][1]["value"] == "man"
    assert load_task(task_dir).data_root == (src / "YouTubeClips").resolve()
    _reconvert_same("msvd_qa", src, tmp_path, recs)


def test_msvd_qa_vid_layout(tmp_path, clips):
    src = tmp_path / "msvd"
    entries = [{"question": "what is sliced?", "answer": "onion", "video": "vid1"},
               {"question": "who sings?", "answer": "woman", "video": "vid2"}]
    _write(src / "train_qa.json", entries)
    _write(src / "test_qa.json", entries[:1])
    for i in (1, 2):
        _write(src / "video" / f"vid{i}.avi", clips["avi"])
    (task_dir,) = convert("msvd_qa", src, tmp_path / "out")
    recs = _check(task_dir, "video", "exact_match", ["train", "test"])
    assert recs["train"]["msvd_qa-train-1"]["video"] == "vid2.avi"  # no "id": the entry's position


def test_msvd_qa_missing_file(tmp_path):
    (tmp_path / "video").mkdir()
    _write(tmp_path / "train_qa.json", [])
    with pytest.raises(SourceError, match=r"msvd_qa: .*test_qa\.json not found; expected layout"):
        convert("msvd_qa", tmp_path, tmp_path / "out", splits=["test"])
    (tmp_path / "video").rmdir()
    with pytest.raises(SourceError, match=r"msvd_qa: .*YouTubeClips not found"):
        convert("msvd_qa", tmp_path, tmp_path / "out")


# -- streams ------------------------------------------------------------------------------------------------------


def test_write_stream(tmp_path, clips):
    src = tmp_path / "flickr30k"
    _flickr(src)
    (flickr,) = convert("flickr30k", src, tmp_path / "tasks")
    osrc = tmp_path / "okvqa"
    _okvqa(osrc)
    (ok,) = convert("okvqa", osrc, tmp_path / "tasks")
    path = write_stream(tmp_path / "streams", "micl_images", [flickr, ok])
    assert path == tmp_path / "streams" / "micl_images.yaml"
    assert yaml.safe_load(path.read_text())["tasks"] == ["../tasks/flickr30k", "../tasks/okvqa"]
    stream = load_stream(path)
    assert [t.name for t in stream.tasks] == ["flickr30k", "okvqa"] and stream.retention == []
    n, problems = validate_path(path)
    assert problems == [] and n == 7 + 5
    path2 = write_stream(tmp_path / "s2.yaml", "x", [ok], retention=[flickr])
    assert [t.name for t in load_stream(path2).retention] == ["flickr30k"]
    with pytest.raises(Exception, match="unique"):
        write_stream(tmp_path / "s3.yaml", "dup", [ok, ok])
    assert not (tmp_path / "s3.yaml").exists()


def test_cli_data_convert_writes_a_valid_task_and_reports_a_missing_layout(tmp_path, capsys):
    from mmcl.cli import main

    src = tmp_path / "flickr"
    _flickr(src)
    assert main(["data", "convert", "flickr30k", str(src), str(tmp_path / "out"), "--limit", "2"]) == 0
    assert "task written" in capsys.readouterr().out
    assert main(["data", "validate", str(tmp_path / "out" / "flickr30k")]) == 0
    assert main(["data", "convert", "okvqa", str(tmp_path / "nothing"), str(tmp_path / "out2")]) == 2
    assert "okvqa" in capsys.readouterr().err
