"""The pre-flight leak check (mmcl.data.overlap) and the built-in instruction set MoInCL distils on: nothing a run
trains on may be an evaluated record, and the check names each overlapping record."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml
from support import QUIET, stream_file

from mmcl.config import load_config
from mmcl.data.overlap import ExtraData, MediaIdentity, evaluated_records, find_overlaps, normalise_prompt
from mmcl.data.records import DataError, Record, Stream, Task
from mmcl.data.synth.instructions import TEMPLATES, instruction_pool
from mmcl.data.synth.text_tasks import text_tasks
from mmcl.engine.setup import build_context


def test_normalise_prompt_by_hand():
    conv = [{"from": "human", "value": "<image>\nWhat is 3  plus 4?"}, {"from": "gpt", "value": "7"}]
    assert normalise_prompt(conv) == "what is 3 plus 4"
    assert normalise_prompt("What is 3 plus 4") == "what is 3 plus 4"
    assert normalise_prompt("Reverse the words: cat, sun!") == "reverse the words cat sun"
    two_turns = [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "x"}, {"from": "human", "value": "Go"}]
    assert normalise_prompt(two_turns) == "hi go"


def _record(tmp: Path, rid: str, prompt: str, image: bytes | None = None, name: str | None = None) -> Record:
    media = {}
    if image is not None:
        path = tmp / (name or f"{rid}.png")
        path.write_bytes(image)
        media = {"image": path}
        prompt = "<image>\n" + prompt
    conv = [{"from": "human", "value": prompt}, {"from": "gpt", "value": "a"}]
    return Record(rid, conv, [], media, f"{tmp}/test.jsonl:{rid[-1]}")


def _stream(*names: str) -> Stream:
    tasks = [Task(n, "image", "qa", "exact_match", {}, Path("."), Path(f"{n}.yaml")) for n in names]
    return Stream("s", tasks[:1], tasks[1:])


def test_find_overlaps_matches_prompt_and_media_bytes(tmp_path):
    test = [_record(tmp_path, "t1", "What colour is the shape?", b"AAA"),
            _record(tmp_path, "t2", "What colour is the shape?", b"BBB"),
            _record(tmp_path, "t3", "What is 2 plus 2?")]
    index = evaluated_records(_stream("qa", "lang"), {"qa": {"test": test[:2]}, "lang": {"test": test[2:]}})
    same_bytes = _record(tmp_path, "x1", "what colour is the shape", b"AAA", name="copy.png")  # other file, same bytes
    other_bytes = _record(tmp_path, "x2", "What colour is the shape?", b"CCC")
    other_prompt = _record(tmp_path, "x3", "What shape is it?", b"BBB")
    found = find_overlaps(index, ExtraData.of_records("train", [same_bytes, other_bytes, other_prompt]))
    assert [(o.task, o.record_id, o.source_at) for o in found] == [("qa", "t1", same_bytes.source)]
    # a text pool: the same prompt with no media is the text record; a media record never equals a text prompt
    found = find_overlaps(index, [ExtraData.pool("pool", ["What is 2 plus 2", "What colour is the shape?"],
                                                 ["f:1", "f:2"])])
    assert [(o.task, o.record_id, o.source_at) for o in found] == [("lang", "t3", "f:1")]
    # a product: one prompt with many inputs
    pseudo = ExtraData("pseudo", ("What colour is the shape?",), (other_bytes.media, same_bytes.media))
    assert [o.record_id for o in find_overlaps(index, [pseudo])] == ["t1"]
    # bytes are read only for records whose prompt matched and whose file sizes are equal, once per file
    longer = _record(tmp_path, "t4", "What colour is the shape?", b"DDDD")
    index = evaluated_records(_stream("qa"), {"qa": {"test": [*test[:2], longer]}})
    identity = MediaIdentity()
    find_overlaps(index, ExtraData.of_records("train", [other_prompt, same_bytes, same_bytes]), identity)
    hashed = {p.name for p in identity._digests}
    assert hashed == {"copy.png", "t1.png", "t2.png"}  # not t4.png (4 bytes) nor x3.png (no prompt match)


def test_builtin_instructions_are_deterministic_distinct_and_disjoint_from_every_evaluated_prompt():
    pool = instruction_pool()
    assert pool == instruction_pool() and len(pool) == len(set(pool)) == 512
    assert instruction_pool(20, seed=1) != instruction_pool(20, seed=0)
    # every test prompt the language skills can produce, for several world seeds (and their train phrasings)
    evaluated = set()
    for seed in range(4):
        for train, test in text_tasks(seed):
            for spec in (train, test):
                evaluated |= {normalise_prompt(s.prompt) for s in spec.generate(random.Random(seed), 3000, 32)}
    assert len(evaluated) > 300
    assert not {normalise_prompt(p) for p in pool} & evaluated
    # by construction: no template opens with the first two words of an evaluated prompt
    openings = {" ".join(p.split()[:2]) for p in evaluated}
    assert not {" ".join(normalise_prompt(t).split()[:2]) for t in TEMPLATES} & openings
    with pytest.raises(ValueError, match="n must be >= 1"):
        instruction_pool(0)


@pytest.fixture
def run_overrides(micro_world, micro_overrides, tmp_path):
    def make(name: str, strategies: str, **extra) -> list[str]:
        stream = stream_file(micro_world, ["caption", "color_qa"], tmp_path)
        return micro_overrides(name, tasks=1, strategies=strategies, **extra) + [f"data.stream={stream}"]

    return make


def test_an_instruction_pool_holding_a_retention_test_prompt_is_refused_naming_it(run_overrides, tmp_path):
    # the leak this check exists for: MoInCL's old default pool, the retention tasks' own training records
    cfg = load_config(None, run_overrides("ok", "[moincl]"))
    ctx, _, _ = build_context(cfg, log=QUIET["log"])  # the built-in pool passes
    test = ctx.records["lang_arith"]["test"]
    train_task = ctx.stream.retention[0]
    lines = [json.loads(x) for x in train_task.splits["train"].read_text().splitlines()]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(json.dumps(r["conversations"][0]["value"]) for r in lines) + "\n")
    leaked = {normalise_prompt(r.conversations) for r in test} & {normalise_prompt(r["conversations"]) for r in lines}
    assert leaked  # the micro world's arithmetic train and test prompts do overlap
    cfg = load_config(None, run_overrides("leak", "[moincl]", **{"strategies.moincl.instructions": str(pool)}))
    with pytest.raises(DataError) as e:
        build_context(cfg, log=QUIET["log"])
    msg = str(e.value)
    n = sum(1 for r in test if normalise_prompt(r.conversations) in leaked)
    assert msg.startswith(f"{n} training input(s) are also evaluated records")
    assert "lang_arith/test" in msg and "test.jsonl:" in msg and "strategy moincl: IKD instructions" in msg
    assert f"{pool}: item " in msg and "id=" in msg
    assert any(p in msg for p in leaked)
    # the same pool with IKD off is not training data
    cfg = load_config(None, run_overrides("off", "[moincl]", **{"strategies.moincl.instructions": str(pool),
                                                                 "strategies.moincl.ikd": "false"}))
    build_context(cfg, log=QUIET["log"])


def _world_copy(micro_world: Path, tmp_path: Path) -> Path:
    """A copy of two micro-world tasks whose color_qa train split also holds its first test record (same bytes)."""
    root = tmp_path / "leaky"
    for t in ("caption", "color_qa"):
        shutil.copytree(micro_world / "tasks" / t, root / t)
    task = root / "color_qa"
    first = json.loads((task / "test.jsonl").read_text().splitlines()[0])
    copy = dict(first, id="leaked-copy", image="images/leaked-copy.png")
    shutil.copy(task / first["image"], task / "images" / "leaked-copy.png")
    with (task / "train.jsonl").open("a") as f:
        f.write(json.dumps(copy) + "\n")
    (root / "stream.yaml").write_text(yaml.safe_dump({
        "name": "leaky", "tasks": [str(root / "color_qa"), str(root / "caption")],  # replay then holds the copy
        "retention": [str(micro_world / "tasks" / "lang_arith")]}))
    return root


def test_a_train_split_holding_a_test_record_is_named_and_replay_of_it_is_not_a_second_error(
        micro_world, micro_overrides, tmp_path, monkeypatch):
    root = _world_copy(micro_world, tmp_path)
    said: list[str] = []
    for strategies in ("[sequential]", "[replay]"):
        cfg = load_config(None, micro_overrides("plain", tasks=1, strategies=strategies)
                          + [f"data.stream={root / 'stream.yaml'}", f"output_dir={tmp_path / strategies[1:4]}"])
        with pytest.raises(DataError) as refused:  # the default: refused, the record named once (replay included)
            build_context(cfg, log=said.append)
        assert str(refused.value).startswith("1 training input(s) are also evaluated records")
        assert "color_qa/test" in str(refused.value) and "id=color_qa-test-00000" in str(refused.value)
        assert "<- train split of color_qa" in str(refused.value) and "train.jsonl:" in str(refused.value)
    # plain="warn" (for a study that knowingly keeps such data) names the same record as a warning
    import mmcl.engine.setup as setup
    from mmcl.data.overlap import check_run

    monkeypatch.setattr(setup, "check_run", lambda *a, **k: [])  # build the context past the check, then run it
    ctx, strategies, _ = build_context(cfg, log=QUIET["log"])
    assert len(check_run(ctx, strategies, plain="warn", log=said.append)) == 1
    warning = [s for s in said if s.startswith("warning:")][-1]
    assert "1 test record(s) also appear in a train split" in warning and "id=color_qa-test-00000" in warning
