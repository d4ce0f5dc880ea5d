"""Tests of task/stream manifests and the record pre-flight check (mmcl.data.records), and `mmcl data validate`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mmcl.cli import main
from mmcl.data.records import DataError, Problem, load_task, read_records
from mmcl.data.streams import load_stream, validate_path


def _png(path: Path, colour: tuple[int, int, int] = (255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def _conv(question: str = "<image>\nWhat colour is it?", answer: str = "red") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _manifest(root: Path, name: str = "colors", split_file: str = "train.jsonl", **extra) -> None:
    root.mkdir(parents=True, exist_ok=True)
    data = {"name": name, "modality": "image", "type": "qa", "scorer": "exact_match", "splits": {"train": split_file}}
    (root / "task.yaml").write_text(yaml.safe_dump({**data, **extra}))


def _jsonl(path: Path, lines: list) -> None:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")


@pytest.fixture
def bad_task(tmp_path: Path) -> tuple[Path, dict[int, str]]:
    """A task whose train.jsonl holds good records and one record per kind of problem; returns (task dir, the
    expected reason pattern per line)."""
    root = tmp_path / "task"
    _manifest(root)
    img = root / "images"
    _png(img / "red.png")
    _png(img / "blue.png", (0, 0, 255))
    (img / "empty.png").write_bytes(b"")
    (img / "garbage.png").write_bytes(os.urandom(256))
    outside = _png(tmp_path / "outside" / "secret.png")
    (img / "link.png").symlink_to(outside)

    lines = [
        {"id": "g1", "image": "images/red.png", "conversations": _conv()},  # 1 good
        '{"id": "j1", "image": "images/red.png", "conversations": [',  # 2 invalid JSON
        {"id": "c1", "image": "images/red.png"},  # 3 no conversations
        {"image": "images/red.png", "conversations": _conv()},  # 4 no id
        {"id": "g1", "image": "images/blue.png", "conversations": _conv()},  # 5 duplicate id
        {"id": "t1", "image": "images/red.png",  # 6 two human turns
         "conversations": [{"from": "human", "value": "<image>\nA?"}, {"from": "human", "value": "B?"}]},
        {"id": "e1", "image": "images/red.png", "conversations": _conv(answer="  ")},  # 7 empty answer
        {"id": "l1", "image": "images/red.png",  # 8 last turn human
         "conversations": [*_conv(), {"from": "human", "value": "and?"}]},
        {"id": "m1", "image": "images/missing.png", "conversations": _conv()},  # 9 image missing
        {"id": "z1", "image": "images/empty.png", "conversations": _conv()},  # 10 zero bytes
        {"id": "u1", "image": "images/garbage.png", "conversations": _conv()},  # 11 undecodable
        {"id": "p1", "image": "images/red.png", "conversations": _conv("What colour?")},  # 12 no placeholder
        {"id": "p2", "conversations": _conv()},  # 13 placeholder, no image key
        {"id": "d1", "image": "../outside/secret.png", "conversations": _conv()},  # 14 .. escape
        {"id": "a1", "image": str(outside), "conversations": _conv()},  # 15 absolute
        {"id": "s1", "image": "images/link.png", "conversations": _conv()},  # 16 symlink out
        {"id": "g2", "image": "images/blue.png", "conversations": _conv(answer="blue"),  # 17 good, with answers
         "answers": ["blue", "navy"]},
    ]
    _jsonl(root / "train.jsonl", lines)
    data_root = re.escape(str(root.resolve()))
    expected = {
        2: r"invalid JSON: Expecting value \(column \d+\)",
        3: r"missing 'conversations'",
        4: r"missing 'id'",
        5: r"duplicate id 'g1'",
        6: r"conversations\[1\] is from 'human' but turns must alternate human, gpt, \.\.\.; expected 'gpt'",
        7: r"conversations\[1\] is an empty answer",
        8: r"the last turn must be a gpt answer",
        9: r"image file not found: .*images/missing\.png",
        10: r"image file is empty: .*images/empty\.png",
        11: r"image file cannot be decoded \(UnidentifiedImageError: .*\): .*images/garbage\.png",
        12: r"record has 'image' media, so its human turns need exactly one <image> \(found 0\)",
        13: r"text contains <image> but the record has no 'image' field",
        14: rf"media path '\.\./outside/secret\.png' resolves to .*outside/secret\.png, outside the data root "
            rf"{data_root} \(set data\.allow_outside_root=true only for data you trust\)",
        15: rf"media path '.*secret\.png' is absolute; paths must be relative to the data root "
            rf"{re.escape(str(root))}",
        16: rf"media path 'images/link\.png' resolves to .*outside/secret\.png, outside the data root {data_root} "
            r"\(set data\.allow_outside_root=true only for data you trust\)",
    }
    return root, expected


def test_every_bad_record_is_reported_with_its_line(bad_task) -> None:
    root, expected = bad_task
    task = load_task(root)
    good, problems = read_records(task, "train")
    path = root / "train.jsonl"
    assert [p.line for p in problems] == sorted(expected)
    for p in problems:
        assert p.file == path
        assert str(p).startswith(f"{path}:{p.line}: ")
        assert str(p) == f"{path}:{p.line}: {p.reason}"
        assert _matches(expected[p.line], p.reason), (p.line, p.reason)
    ids = {p.line: p.id for p in problems}
    assert ids[2] is None and ids[4] is None
    assert ids[5] == "g1" and ids[16] == "s1"
    assert [r.id for r in good] == ["g1", "g2"]


def _matches(pattern: str, text: str) -> bool:
    return re.fullmatch(pattern, text) is not None


def test_good_records_have_resolved_media_and_references(bad_task) -> None:
    root, _ = bad_task
    good, _ = read_records(load_task(root), "train")
    g1, g2 = good
    assert g1.media == {"image": (root / "images" / "red.png").resolve()}
    assert g1.media["image"].is_absolute()
    assert g1.answer == "red"
    assert g1.answers == []
    assert g1.references == ["red"]  # falls back to the answer
    assert g2.references == ["blue", "navy"]
    assert g1.source == f"{root / 'train.jsonl'}:1"
    assert g2.source == f"{root / 'train.jsonl'}:17"


def test_allow_outside_root_accepts_the_escaping_paths(bad_task, tmp_path: Path) -> None:
    root, expected = bad_task
    good, problems = read_records(load_task(root), "train", allow_outside_root=True)
    assert [p.line for p in problems] == sorted(set(expected) - {14, 15, 16})
    secret = (tmp_path / "outside" / "secret.png").resolve()
    by_id = {r.id: r for r in good}
    assert sorted(by_id) == ["a1", "d1", "g1", "g2", "s1"]
    assert by_id["d1"].media["image"] == secret
    assert by_id["a1"].media["image"] == secret
    assert by_id["s1"].media["image"] == secret


def test_validate_path_reports_the_same_problems(bad_task) -> None:
    root, expected = bad_task
    total, problems = validate_path(root)
    assert total == 17
    assert [p.line for p in problems] == sorted(expected)
    total, problems = validate_path(root / "task.yaml", allow_outside_root=True)
    assert total == 17
    assert [p.line for p in problems] == sorted(set(expected) - {14, 15, 16})


def test_check_media_false_skips_file_checks_but_not_path_checks(bad_task) -> None:
    root, expected = bad_task
    good, problems = read_records(load_task(root), "train", check_media=False)
    assert [p.line for p in problems] == sorted(set(expected) - {9, 10, 11})
    assert [r.id for r in good] == ["g1", "m1", "z1", "u1", "g2"]


def test_blank_lines_keep_line_numbers_and_limit_stops_early(tmp_path: Path) -> None:
    root = tmp_path / "t"
    _manifest(root)
    _png(root / "a.png")
    rec = {"image": "a.png", "conversations": _conv()}
    _jsonl(root / "train.jsonl", [{"id": "1", **rec}, "", "   ", {"id": "2", **rec}, "{oops", {"id": "3", **rec}])
    good, problems = read_records(load_task(root), "train")
    assert [r.source.rsplit(":", 1)[1] for r in good] == ["1", "4", "6"]
    assert [(p.line, p.reason[:12]) for p in problems] == [(5, "invalid JSON")]
    good, problems = read_records(load_task(root), "train", limit=2)
    assert [r.id for r in good] == ["1", "2"]
    assert [p.line for p in problems] == []


@pytest.mark.parametrize("value", [["a.png"], None, 3])
def test_non_string_media_path_is_a_problem_not_a_crash(tmp_path: Path, value) -> None:
    root = tmp_path / "t"
    _manifest(root)
    _png(root / "a.png")
    _jsonl(root / "train.jsonl", [{"id": "1", "image": value, "conversations": _conv()}])
    good, problems = read_records(load_task(root), "train")
    assert good == []
    assert [p.line for p in problems] == [1]


def test_invalid_utf8_line_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    root = tmp_path / "t"
    _manifest(root)
    _png(root / "a.png")
    good_line = json.dumps({"id": "1", "image": "a.png", "conversations": _conv()}).encode()
    (root / "train.jsonl").write_bytes(good_line + b"\n" + b'{"id": "\xff\xfe"}\n')
    good, problems = read_records(load_task(root), "train")
    assert [r.id for r in good] == ["1"]
    assert [p.line for p in problems] == [2]


def test_missing_split_file_is_a_problem(tmp_path: Path) -> None:
    root = tmp_path / "t"
    _manifest(root)
    good, problems = read_records(load_task(root), "train")
    assert good == []
    assert problems == [Problem(root / "train.jsonl", 0, f"split file not found (named in {root / 'task.yaml'})")]


def test_unknown_split_names_the_existing_ones(tmp_path: Path) -> None:
    root = tmp_path / "t"
    _manifest(root)
    with pytest.raises(KeyError, match=r"task 'colors' has no split 'test' \(it has \['train'\]\)"):
        read_records(load_task(root), "test")


def test_llava_style_json_list_loads(tmp_path: Path) -> None:
    root = tmp_path / "llava"
    _manifest(root, split_file="train.json", data_root="media")
    _png(root / "media" / "coco" / "1.png")
    data = [
        {"id": "000001", "image": "coco/1.png",
         "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A red square."},
                           {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "000002", "image": "coco/2.png", "conversations": _conv()},
    ]
    (root / "train.json").write_text(json.dumps(data, indent=2))
    task = load_task(root)
    assert task.data_root == root / "media"
    good, problems = read_records(task, "train")
    assert [r.id for r in good] == ["000001"]
    assert good[0].media == {"image": (root / "media" / "coco" / "1.png").resolve()}
    assert good[0].answer == "Red."
    assert len(good[0].conversations) == 4
    # a JSON list has no line per record: the 1-based record number is reported
    assert [(p.line, p.id) for p in problems] == [(2, "000002")]
    assert problems[0].reason.startswith("image file not found")


def test_json_split_that_is_not_a_list(tmp_path: Path) -> None:
    root = tmp_path / "llava"
    _manifest(root, split_file="train.json")
    (root / "train.json").write_text('{"id": "1"}')
    _, problems = read_records(load_task(root), "train")
    assert [str(p) for p in problems] == [
        f"{root / 'train.json'}:1: a .json split file must hold a list of records (LLaVA format)"
    ]


# -- manifests and streams -------------------------------------------------------------------------------------------


def test_load_task_reads_the_manifest(tmp_path: Path) -> None:
    root = tmp_path / "t"
    _manifest(root, description="colours", max_new_tokens=4)
    task = load_task(root / "task.yaml")
    assert (task.name, task.modality, task.type, task.scorer) == ("colors", "image", "qa", "exact_match")
    assert task.splits == {"train": root / "train.jsonl"}
    assert task.data_root == root / "."
    assert task.manifest == root / "task.yaml"
    assert (task.description, task.max_new_tokens) == ("colours", 4)


def test_load_task_missing_manifest(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty/task\.yaml: task manifest not found \(a task is a directory with a "
                                        r"task\.yaml\)"):
        load_task(tmp_path / "empty")


def test_load_task_lists_missing_fields(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    (root / "task.yaml").write_text(yaml.safe_dump({"name": "x", "modality": "image", "splits": {"train": "a.jsonl"}}))
    with pytest.raises(DataError, match=r"task\.yaml: missing field\(s\) type, scorer; required: name, modality, "
                                        r"type, scorer, splits$"):
        load_task(root)


def test_load_task_bad_modality(tmp_path: Path) -> None:
    root = tmp_path / "t"
    _manifest(root, modality="smell")
    with pytest.raises(DataError, match=r"modality 'smell' must be one of image, audio, video, text$"):
        load_task(root)


def test_load_task_bad_splits_and_yaml(tmp_path: Path) -> None:
    root = tmp_path / "t"
    _manifest(root, splits=[])
    with pytest.raises(DataError, match=r"splits must map split names to files"):
        load_task(root)
    (root / "task.yaml").write_text("- a list\n")
    with pytest.raises(DataError, match=r"task\.yaml: expected a mapping at the top level, got list"):
        load_task(root)


@pytest.fixture
def stream_file(tmp_path: Path) -> Path:
    for name in ("a", "b", "c", "lang"):
        _manifest(tmp_path / "tasks" / name, name=name)
    path = tmp_path / "stream.yaml"
    stream = {"name": "abc", "tasks": ["tasks/a", "tasks/b", "tasks/c"], "retention": ["tasks/lang"]}
    path.write_text(yaml.safe_dump(stream))
    return path


def test_load_stream_in_file_order(stream_file: Path) -> None:
    stream = load_stream(stream_file)
    assert stream.name == "abc"
    assert [t.name for t in stream.tasks] == ["a", "b", "c"]
    assert [t.name for t in stream.retention] == ["lang"]
    assert [t.name for t in stream.all_tasks] == ["a", "b", "c", "lang"]


def test_load_stream_order_reorders(stream_file: Path) -> None:
    stream = load_stream(stream_file, order=["c", "a", "b"])
    assert [t.name for t in stream.tasks] == ["c", "a", "b"]
    assert stream.tasks[0].manifest == stream_file.parent / "tasks" / "c" / "task.yaml"
    assert [t.name for t in stream.retention] == ["lang"]


@pytest.mark.parametrize(
    "order, message",
    [
        (["a", "b"], r"data\.order must be a permutation of the stream's tasks \['a', 'b', 'c'\]; got \['a', 'b'\]$"),
        (["a", "a", "b"], r"permutation of the stream's tasks \['a', 'b', 'c'\]; got \['a', 'a', 'b'\]$"),
        (["a", "b", "x"], r"got \['a', 'b', 'x'\] \(unknown: x\)$"),
        (["a", "b", "c", "lang"], r"\(unknown: lang\)$"),
    ],
)
def test_load_stream_refuses_non_permutation_order(stream_file: Path, order: list[str], message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_stream(stream_file, order=order)


def test_load_stream_refuses_duplicate_task_names(tmp_path: Path, stream_file: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump({"tasks": ["tasks/a", "tasks/b"], "retention": ["tasks/a"]}))
    with pytest.raises(DataError, match=r"dup\.yaml: task names must be unique; repeated: a$"):
        load_stream(path)


def test_load_stream_needs_tasks(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("name: nothing\n")
    with pytest.raises(DataError, match=r"s\.yaml: a stream needs a non-empty 'tasks' list"):
        load_stream(path)


# -- the CLI ---------------------------------------------------------------------------------------------------------


def test_cli_validate_lists_each_problem_and_fails(bad_task, capsys) -> None:
    root, expected = bad_task
    rc = main(["data", "validate", str(root)])
    out, err = capsys.readouterr()
    assert rc == 1
    lines = out.splitlines()
    path = root / "train.jsonl"
    assert [line.split(": ", 1)[0] for line in lines] == [f"{path}:{n}" for n in sorted(expected)]
    for line, n in zip(lines, sorted(expected)):
        assert _matches(expected[n], line.split(": ", 1)[1]), line
    assert "17 records checked, 15 bad" in err


def test_cli_validate_allow_outside_root(bad_task, capsys) -> None:
    root, expected = bad_task
    rc = main(["data", "validate", str(root), "--allow-outside-root"])
    out, _ = capsys.readouterr()
    assert rc == 1
    assert len(out.splitlines()) == len(expected) - 3


def test_cli_validate_clean_task(tmp_path: Path, capsys) -> None:
    root = tmp_path / "clean"
    _manifest(root)
    _png(root / "a.png")
    _jsonl(root / "train.jsonl", [{"id": str(i), "image": "a.png", "conversations": _conv()} for i in range(3)])
    rc = main(["data", "validate", str(root)])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out == ""
    assert "3 records checked, 0 bad" in err


def test_cli_validate_missing_task_is_an_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "nothing").mkdir()
    rc = main(["data", "validate", str(tmp_path / "nothing")])
    _, err = capsys.readouterr()
    assert rc == 2
    assert "task manifest not found" in err


def test_cli_validate_a_bare_records_file(tmp_path: Path, capsys) -> None:
    """A user's own `.jsonl` (or LLaVA `.json` list) checks without a task manifest: media relative to the file's
    folder unless --data-root says otherwise; each bad record is `file:line: reason`."""
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "imgs" / "a.png")
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    good = {"id": "1", "image": "imgs/a.png", "conversations": conv}
    lines = [json.dumps(good), json.dumps({**good, "id": "2", "image": "imgs/missing.png"}), "not json"]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    assert main(["data", "validate", str(jsonl)]) == 1
    cap = capsys.readouterr()
    assert cap.out.splitlines() == [f"{jsonl}:2: image file not found: {tmp_path / 'imgs' / 'missing.png'}",
                                    f"{jsonl}:3: invalid JSON: Expecting value (column 1)"]
    assert "3 records checked, 2 bad" in cap.err
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    assert main(["data", "validate", str(jsonl), "--data-root", str(elsewhere)]) == 1
    assert f"{jsonl}:1: image file not found" in capsys.readouterr().out
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([good, {**good, "id": "3"}]))
    assert main(["data", "validate", str(llava)]) == 0
    assert "2 records checked, 0 bad" in capsys.readouterr().err
