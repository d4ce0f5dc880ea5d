"""The examples a new user starts from write data mmcl accepts as it is."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mmcl.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_example_writes_a_valid_llava_stream_with_disjoint_splits(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the digits example reads scikit-learn's bundled digits (.[test])")
    stream = _load("digits").write(tmp_path / "digits")
    assert main(["data", "validate", str(stream)]) == 0
    assert main(["data", "validate", str(stream.with_name("stream-0-4.yaml"))]) == 0
    seen: dict[str, set[str]] = {}
    for task in ("digits_0_4", "digits_5_9"):
        for split in ("train", "test"):
            records = json.loads((tmp_path / "digits" / task / f"{split}.json").read_text())
            seen[f"{task}/{split}"] = {r["image"] for r in records}
            answers = {r["conversations"][1]["value"] for r in records}
            assert answers == ({"zero", "one", "two", "three", "four"} if task == "digits_0_4"
                               else {"five", "six", "seven", "eight", "nine"})
        assert not seen[f"{task}/train"] & seen[f"{task}/test"]
        n = len(seen[f"{task}/train"]) + len(seen[f"{task}/test"])
        assert len(seen[f"{task}/test"]) == int(0.2 * n)  # the seeded 20 % held out
    # 1,797 digits in all, each written once
    assert sum(len(v) for v in seen.values()) == 1797
