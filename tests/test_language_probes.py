"""Language retention on real text: the probes shipped with mmcl (built from pydoc_data's prose), the log-likelihood
scorer checked against a bigram model whose probabilities are written by hand and against a direct forward of real
models (the composition and a native LLaVA), P1's language change against hand-worked harmonic means, and
`mmcl run` with `probe:nlu` and `probe:nlg` retention entries on the micro world."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import pytest
import torch
import yaml
from support import Bigram, word_processor, word_tokenizer

from mmcl.data.records import PROBES_DIR, DataError, load_task, read_records
from mmcl.data.streams import load_stream
from mmcl.eval.language import (
    continuation_logprobs,
    encode_chat,
    encode_plain,
    evaluate_language_task,
    probe_items,
    write_probes,
)
from mmcl.eval.metrics import compute_metrics, language_change, language_kind
from mmcl.models.base import MLLM
from mmcl.models.loading import load_backend


def test_continuation_logprobs_are_sums_of_the_hand_written_table():
    model = Bigram()
    pairs = [([1], [2, 3]), ([0], [1]), ([2, 3, 1], [1]), ([3], [2])]
    got = continuation_logprobs(model, pairs, pad_id=0, batch_size=3, device=torch.device("cpu"))
    # log p(b|a) + log p(c|b) = log .25 + log .6; greedy after a is a (.5), so not greedy
    assert got[0][0] == pytest.approx(math.log(0.25) + math.log(0.6), abs=1e-6) and got[0][1] is False
    assert got[1] == (pytest.approx(math.log(0.4), abs=1e-6), True)  # after <s>: a, b tie at .4; argmax: the first, a
    assert got[2] == (pytest.approx(math.log(0.5), abs=1e-6), True)  # a after a: greedy, despite the padding
    assert got[3][0] == pytest.approx(math.log(0.25), abs=1e-6)
    # the input cut to 2 positions from the left (b c a -> c a, then b is the target): a bigram needs no more
    short = continuation_logprobs(model, [([2, 3, 1], [2])], pad_id=0, batch_size=1, device=torch.device("cpu"),
                                  max_length=2)
    assert short[0][0] == pytest.approx(math.log(0.25), abs=1e-6)
    for pairs, match in [([([1], [])], "at least one token"), ([([], [1])], "context of at least one token"),
                         ([([1], [1, 2, 3])], "continuation of 3 tokens is over the model's 2 positions")]:
        with pytest.raises(ValueError, match=match):
            continuation_logprobs(model, pairs, pad_id=0, batch_size=1, device=torch.device("cpu"), max_length=2)


def test_encode_plain_splits_like_lm_eval():
    tok = word_tokenizer()
    assert encode_plain(tok, "a b", " c") == ([1, 2], [3])
    assert encode_plain(tok, "a b ", "c") == ([1, 2], [3])  # the context's trailing space moves to the option
    assert encode_plain(tok, "", "a b") == ([0], [1, 2])  # no context: the prefix (bos) token


def _records(tmp_path: Path, scorer: str, lines: list[dict]) -> tuple:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "task.yaml").write_text(yaml.safe_dump({"name": "t", "modality": "text", "type": "mcq",
                                                        "scorer": scorer, "format": "plain",
                                                        "splits": {"test": "test.jsonl"}}))
    task = load_task(tmp_path)
    good, bad = read_records(task, "test")
    assert not bad, bad
    return task, good


def turns(prompt: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]


def test_choice_and_perplexity_scores_by_hand(tmp_path):
    model, proc = Bigram(), word_processor()
    # after "a": b (.25) beats c (.20), so q1 picks "b" (right); after "b": c (.60) beats a (.10), so q2 picks "c"
    # (wrong, its answer is "a"): one of two right, 50
    task, recs = _records(tmp_path / "nlu", "loglik_choice", [
        {"id": "q1", "conversations": turns("a", "b"), "choices": ["c", "b"]},
        {"id": "q2", "conversations": turns("a b", "a"), "choices": ["a", "c"]},
    ])  # fmt: skip
    res = evaluate_language_task(model, proc, task, recs, batch_size=4, device=torch.device("cpu"))
    assert [p["prediction"] for p in res.predictions] == ["b", "c"]
    assert res.score == 50.0
    assert res.predictions[0]["loglik"] == [pytest.approx(math.log(0.2), abs=1e-4),
                                            pytest.approx(math.log(0.25), abs=1e-4)]
    # NLG: "a" then " b c": log .25 + log .6 over the 4 bytes of " b c"; "b" then " c": log .6 over 2 bytes.
    # Score = 100 * exp(-(total nll) / (total bytes)) = 100 * exp((log .25 + 2 log .6) / 6)
    task, recs = _records(tmp_path / "nlg", "loglik_perplexity", [
        {"id": "s1", "conversations": turns("a", "b c")}, {"id": "s2", "conversations": turns("b", "c")}])
    res = evaluate_language_task(model, proc, task, recs, batch_size=1, device=torch.device("cpu"))
    assert res.score == pytest.approx(100 * math.exp((math.log(0.25) + 2 * math.log(0.6)) / 6), abs=1e-4)
    assert res.score == pytest.approx(66.9433, abs=1e-3)  # exp(-2.407946 / 6) = .669433
    assert res.predictions[1]["score"] == pytest.approx(100 * math.exp(math.log(0.6) / 2), abs=1e-4)  # 77.46


def test_bad_choices_are_reported_per_record(tmp_path):
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"id": "ok", "conversations": turns("p", "x"), "choices": ["x", "y"]},
        {"id": "none", "conversations": turns("p", "x")},
        {"id": "notin", "conversations": turns("p", "x"), "choices": ["y", "z"]},
        {"id": "dupe", "conversations": turns("p", "x"), "choices": ["x", "x"]},
    ]) + "\n")  # fmt: skip
    (tmp_path / "task.yaml").write_text(yaml.safe_dump({"name": "t", "modality": "text", "type": "mcq",
                                                        "scorer": "loglik_choice", "splits": {"test": "test.jsonl"}}))
    good, bad = read_records(load_task(tmp_path), "test")
    assert [r.id for r in good] == ["ok"] and good[0].choices == ["x", "y"]
    assert [(p.line, p.reason.split(" (")[0]) for p in bad] == [
        (2, "missing 'choices'"), (3, "the answer 'x' is not one of the 'choices'"),
        (4, "'choices' must be a list of at least two different non-empty strings")]


# -- the probes -------------------------------------------------------------------------------------------------------

TOPICS = {
    "one": "A heading\n*********\n\nThe first sentence of this paragraph is plain prose about values. "
           "The second sentence also reads like prose about types.\n\n   code = 1  # indented: skipped\n",
    "two": "Another paragraph holds several sentences of ordinary English text here. "
           "It ends with a lower case word called statement.",
}


def test_probe_items_are_deterministic_disjoint_and_well_formed():
    nlu, nlg = probe_items(TOPICS)
    assert (nlu, nlg) == probe_items(TOPICS)
    assert nlu and nlg  # the fixture's paragraphs fall on both sides of the hash split
    for r in nlu:
        prompt, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert answer in r["choices"] and len(set(r["choices"])) == len(r["choices"]) >= 2
        assert f"{prompt} {answer}." in " ".join(TOPICS.values())
    sentences_nlu = {r["conversations"][0]["value"] for r in nlu}
    for r in nlg:
        text = f"{r['conversations'][0]['value']} {r['conversations'][1]['value']}"
        assert text in " ".join(TOPICS.values()) and not any(text.startswith(s) for s in sentences_nlu)
    assert not any("code" in r["conversations"][0]["value"] for r in nlu + nlg)


def test_shipped_probes_load_and_are_what_the_builder_writes(tmp_path):
    counts = {}
    ids = set()
    for name in ("nlu", "nlg"):
        task = load_task(PROBES_DIR / name)
        good, bad = read_records(task, "test")
        assert not bad and task.format == "plain" and task.name == f"probe-{name}"
        counts[name] = len(good)
        ids |= {r.id for r in good}
        if name == "nlu":
            assert all(len(r.choices) == 4 and r.answer in r.choices for r in good)
    assert counts == {"nlu": 407, "nlg": 220} and len(ids) == 627
    manifest = yaml.safe_load((PROBES_DIR / "nlu" / "task.yaml").read_text())
    if f"Python {platform.python_version()}" not in manifest["source"]:
        pytest.skip(f"the probes were built from another Python's pydoc_data ({manifest['source']})")
    built = write_probes(tmp_path)
    for name, d in built.items():
        assert (d / "test.jsonl").read_bytes() == (PROBES_DIR / name / "test.jsonl").read_bytes()


def test_stream_retention_entries(tmp_path, micro_world, monkeypatch):
    from importlib.util import find_spec

    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "local.yaml").write_text("# an lm-eval task file\ntask: my_local\nfn: !function utils.f\n")
    stream = tmp_path / "s.yaml"

    def write(retention: list[str]) -> Path:
        stream.write_text(yaml.safe_dump({"tasks": [str(micro_world / "tasks" / "color_qa")], "retention": retention}))
        return stream

    s = load_stream(write([str(micro_world / "tasks" / "lang_arith"), "probe:nlu", "probe:nlg"]))
    assert [t.name for t in s.retention] == ["lang_arith", "probe-nlu", "probe-nlg"]
    assert s.retention[1].scorer == "loglik_choice" and s.retention[2].scorer == "loglik_perplexity"
    for bad in ("probe:xyz", "probe:nlu:0", "probe:nlu:ten"):
        with pytest.raises(DataError, match=r"write probe:NAME or probe:NAME:N .*NAME one of nlg, nlu"):
            load_stream(write([bad]))
    [small] = load_stream(write(["probe:nlu:100"])).retention
    assert (small.name, small.limit) == ("probe-nlu-100", 100)
    lm_eval = ["lm_eval:arc_easy, lm/local.yaml"]
    if find_spec("lm_eval") is None:
        with pytest.raises(DataError, match=r"needs lm-evaluation-harness, which is not installed; .*mmcl\[lmeval\]"):
            load_stream(write(lm_eval))
        pytest.skip("lm-eval is not installed (optional: pip install 'mmcl[lmeval]'): its entries are refused")
    s = load_stream(write(lm_eval))
    assert [t.name for t in s.retention] == ["lm_eval-arc_easy", "lm_eval-my_local"]
    assert [t.lm_eval_task for t in s.retention] == ["arc_easy", str(tmp_path / "lm" / "local.yaml")]
    assert s.retention[0].splits == {}
    for bad, match in [("lm_eval:", "names no task"), ("lm_eval:missing.yaml", "missing or has no 'task:' name")]:
        with pytest.raises(DataError, match=match):
            load_stream(write([bad]))


def test_probe_records_are_seen_by_the_leak_check(tmp_path, micro_world):
    from mmcl.data.overlap import ExtraData, evaluated_records, find_overlaps

    stream = tmp_path / "s.yaml"
    stream.write_text(yaml.safe_dump({"tasks": [str(micro_world / "tasks" / "color_qa")],
                                      "retention": ["probe:nlu", "probe:nlg"]}))
    s = load_stream(stream)
    records = {t.name: {"test": read_records(t, "test")[0]} for t in s.retention}
    leaked = records["probe-nlg"]["test"][5]
    found = find_overlaps(evaluated_records(s, records),
                          [ExtraData.pool("a user's text data", [leaked.conversations[0]["value"].upper()])])
    assert [(o.task, o.record_id) for o in found] == [("probe-nlg", leaked.id)]


# -- any backend ------------------------------------------------------------------------------------------------------


def _direct(model: MLLM, ids: list[int], n: int) -> float:
    """Log-probability of the last n of `ids` from one unpadded forward of the model's language model."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x, torch.ones_like(x), **model.media_inputs([{}], x)).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[t - 1, ids[t]] for t in range(len(ids) - n, len(ids))))


@pytest.mark.parametrize("backend", ["mmcl", "llava"])
def test_scorer_matches_an_unpadded_forward_on_real_backends(backend, micro_model, hf_checkpoints):
    model, proc = load_backend(micro_model if backend == "mmcl" else hf_checkpoints[backend])
    model.eval()
    pairs = [encode_plain(proc.tokenizer, "What is 3 plus", " 4"), encode_plain(proc.tokenizer, "the", " red one"),
             encode_chat(proc, "What is 3 plus 4?", "7")]
    got = continuation_logprobs(model, pairs, pad_id=proc.pad_id, batch_size=3, device=torch.device("cpu"))
    for (ctx, cont), (ll, _) in zip(pairs, got):
        assert ll == pytest.approx(_direct(model, ctx + cont, len(cont)), abs=1e-4)
    # the chat form: the context is exactly the generation prompt and the option stops before the end token
    conv = turns("What is 3 plus 4?", "7")
    ctx, opt = pairs[2]
    full, labels = proc.encode(conv)
    assert ctx == proc.encode(conv, for_generation=True)[0]
    assert full[:len(ctx) + len(opt)] == ctx + opt and full[len(ctx) + len(opt)] in proc.eos_ids
    assert labels[len(ctx):len(ctx) + len(opt)] == opt


# -- P1's language change ---------------------------------------------------------------------------------------------


def test_language_change_by_hand():
    names = ["probe-nlu", "lm_eval-arc_easy", "probe-nlg", "lang_arith"]
    R = [[50, 25, 60, 90], [45, 30, 50, 10], [40, 20, 30, 0]]
    got = language_change(R, names)
    # NLU: HM(50, 25) = 33.333, HM(40, 20) = 26.667 -> 6.667; NLG: 60 - 30 = 30;
    # NL: HM(50, 25, 60) = 3 / (1/50 + 1/25 + 1/60) = 39.130, HM(40, 20, 30) = 27.692 -> 11.438
    assert got["nlu"] == pytest.approx(100 / 3 - 80 / 3, abs=1e-9)
    assert got["nlg"] == pytest.approx(30.0)
    assert got["nl"] == pytest.approx(3 / (1 / 50 + 1 / 25 + 1 / 60) - 3 / (1 / 40 + 1 / 20 + 1 / 30), abs=1e-9)
    assert got["nl"] == pytest.approx(11.438, abs=1e-3)
    assert got["tasks"] == {"nlu": ["probe-nlu", "lm_eval-arc_easy"], "nlg": ["probe-nlg"]}
    # after row 1: NLU HM(45, 30) = 36 -> 33.333 - 36 = -2.667 (gained); NLG 60 - 50 = 10
    row1 = language_change(R, names, row=1)
    assert row1["nlu"] == pytest.approx(100 / 3 - 36) and row1["nlg"] == pytest.approx(10.0)
    # a zero counts as 0.001: HM(0.001, 25) ~ 0.002
    zero = language_change([[50, 25], [0, 25]], ["probe-nlu", "nlu_mine"])
    assert zero["nlu"] == pytest.approx(100 / 3 - 2 / (1 / 0.001 + 1 / 25), abs=1e-9)
    assert zero["nlg"] is None
    assert language_change(R, ["lang_arith", "x", "y", "z"]) is None
    assert [language_kind(n) for n in ["probe-nlg", "lm_eval-lambada_standard", "lm_eval-wsc273", "nlg_news",
                                       "lang_arith", "lm_eval-hellaswag"]] == ["nlg", "nlg", "nlu", "nlg", None, None]


def test_compute_metrics_reports_language_change_per_row():
    matrix = {"tasks": ["t1", "t2"], "retention": ["probe-nlu", "probe-nlg", "lang_arith"], "rows": [
        {"after": None, "scores": {"t1": 0, "t2": 0, "probe-nlu": 50, "probe-nlg": 40, "lang_arith": 80}},
        {"after": "t1", "scores": {"t1": 90, "t2": 0, "probe-nlu": 45, "probe-nlg": 40, "lang_arith": 70}},
        {"after": "t2", "scores": {"t1": 60, "t2": 80, "probe-nlu": 30, "probe-nlg": 20, "lang_arith": 50}}]}
    m = compute_metrics(matrix)["language_change"]
    base = 2 / (1 / 50 + 1 / 40)  # HM(50, 40) = 44.444
    assert m["per_row"] == [{"nlu": 5.0, "nlg": 0.0, "nl": pytest.approx(base - 2 / (1 / 45 + 1 / 40))},
                            {"nlu": 20.0, "nlg": 20.0, "nl": pytest.approx(base - 2 / (1 / 30 + 1 / 20))}]
    assert (m["nlu"], m["nlg"]) == (20.0, 20.0)
    matrix["retention"] = ["lang_arith"]
    for r in matrix["rows"]:
        r["scores"] = {k: v for k, v in r["scores"].items() if not k.startswith("probe")}
    assert "language_change" not in compute_metrics(matrix)  # shown only when the stream has language columns


# -- end to end -------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_mmcl_run_with_probe_retention(micro_world, micro_model, tmp_path):
    from mmcl.cli import main

    stream = tmp_path / "stream.yaml"
    stream.write_text(yaml.safe_dump({"name": "probes", "tasks": [str(micro_world / "tasks" / t)
                                                                  for t in ("color_qa", "shape_cls")],
                                      "retention": [str(micro_world / "tasks" / "lang_arith"), "probe:nlu",
                                                    "probe:nlg:5"]}))
    out = tmp_path / "run"
    assert main(["run", f"output_dir={out}", f"model.path={micro_model}", f"data.stream={stream}",
                 "data.train_limit=8", "data.test_limit=6", "train.batch_size=4", "train.max_steps=2",
                 "eval.max_new_tokens=2", "--no-progress"]) == 0
    matrix = json.loads((out / "matrix.json").read_text())
    assert matrix["retention"] == ["lang_arith", "probe-nlu", "probe-nlg-5"]
    for row in matrix["rows"]:  # 6 NLU records: a multiple of 100/6; the NLG score is a probability per byte
        assert abs(row["scores"]["probe-nlu"] * 6 / 100 - round(row["scores"]["probe-nlu"] * 6 / 100)) < 1e-3
        assert 0 < row["scores"]["probe-nlg-5"] < 100
    preds = [json.loads(x) for x in (out / "predictions" / "row-02" / "probe-nlu.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and all(p["prediction"] in p["choices"] and len(p["loglik"]) == 4 for p in preds)
    assert len((out / "predictions" / "row-02" / "probe-nlg-5.jsonl").read_text().splitlines()) == 5  # its first 5
    change = json.loads((out / "metrics.json").read_text())["language_change"]
    R = [[r["scores"][n] for n in ("probe-nlu", "probe-nlg-5")] for r in matrix["rows"]]
    assert change["nlu"] == pytest.approx(max(R[0][0], 1e-3) - max(R[2][0], 1e-3), abs=1e-3)  # one column: HM = it
    assert change["nlg"] == pytest.approx(R[0][1] - R[2][1], abs=1e-3) and len(change["per_row"]) == 2
    report = (out / "report.md").read_text()
    assert "## Language change (P1)" in report and "NLG Δ" in report
