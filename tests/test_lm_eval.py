"""lm-evaluation-harness as a retention task, offline: local YAML task files over a local JSONL (tests/data/lm_eval)
run through lm-eval's own `simple_evaluate` on mmcl's model, in the three request types (multiple choice by
log-likelihood, rolling perplexity, generation), checked against mmcl's own scorer and against a bigram model whose
probabilities are written by hand; and an `lm_eval:` column in a row of the accuracy matrix.

lm-eval is the optional extra `lmeval` (its install adds ~75 s to a set-up, so it is not in `test`): without it
these tests skip and say so; the metric-scale rule runs either way."""

from __future__ import annotations

import json
import math
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from support import FAST, Bigram, engine_objects, word_processor

from mmcl.data.streams import retention_tasks
from mmcl.eval.language import continuation_logprobs, encode_plain
from mmcl.eval.lm_eval_adapter import evaluate_lm_eval_task, language_model, matrix_score

DATA = Path(__file__).parent / "data" / "lm_eval"
needs_lm_eval = pytest.mark.skipif(find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (optional: pip install 'mmcl[lmeval]')")
CPU = torch.device("cpu")


def test_matrix_score_puts_every_metric_kind_on_the_0_100_scale():
    assert matrix_score({"acc,none": 0.75, "acc_stderr,none": 0.1, "alias": "x"}, {"acc": True}) == ("acc", 75.0)
    assert matrix_score({"bleu,none": 31.5}, {"bleu": True}) == ("bleu", 31.5)  # already a 0-100 score
    rolling = {"word_perplexity,none": 40.0, "byte_perplexity,none": 2.0, "bits_per_byte,none": 1.0}
    low = {"word_perplexity": False, "byte_perplexity": False, "bits_per_byte": False}
    assert matrix_score(rolling, low) == ("byte_perplexity", 50.0)  # 100 / 2
    assert matrix_score({"bits_per_byte,none": 2.0}, {"bits_per_byte": False}) == ("bits_per_byte", 25.0)
    with pytest.raises(ValueError, match="no metric mmcl can put on a 0-100 scale"):
        matrix_score({"loss,none": 3.0}, {"loss": False})


def test_without_lm_eval_the_error_says_how_to_install_it(monkeypatch):
    import sys

    from mmcl.data.records import DataError

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what a missing package looks like to `import`
    with pytest.raises(DataError, match=r"not installed .*pip install 'mmcl\[lmeval\]' \(lm-eval==0.4.13\)"):
        language_model(Bigram(), word_processor(), batch_size=1, device=CPU)


def _instances(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, k) for k, a in enumerate(args)]


@needs_lm_eval
def test_lm_subclass_by_hand():
    lm = language_model(Bigram(), word_processor(), batch_size=2, device=CPU)
    lls = lm.loglikelihood(_instances("loglikelihood", [("a", " b c"), ("", "a")]))
    assert lls[0][0] == pytest.approx(math.log(0.25) + math.log(0.6), abs=1e-6) and lls[0][1] is False
    assert lls[1] == (pytest.approx(math.log(0.4), abs=1e-6), True)  # empty context: conditioned on <s>
    # rolling: every token once, the first given <s>: log p(a|<s>) + log p(b|a) + log p(c|b) + log p(c|c), in
    # windows of 2 tokens (max_length 2) it must be the same sum
    lm.max_length = 2
    rolled = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [("a b c c",)]))
    assert rolled[0] == pytest.approx(math.log(0.4) + math.log(0.25) + math.log(0.6) + math.log(0.25), abs=1e-6)


@needs_lm_eval
@pytest.mark.parametrize("spec", ["mmcl_cloze", "mmcl_text", "mmcl_gen"])
def test_local_tasks_through_simple_evaluate(spec, micro_model, tmp_path, monkeypatch):
    from mmcl.models.loading import load_backend

    monkeypatch.chdir(tmp_path)  # the task file's data path resolves against its own folder, not the cwd
    model, proc = load_backend(micro_model)
    [task] = retention_tasks(f"lm_eval:{DATA / spec}.yaml", tmp_path / "stream.yaml")
    assert task.name == f"lm_eval-{spec}"
    res = evaluate_lm_eval_task(model, proc, task, batch_size=2, device=CPU)
    docs = [json.loads(x) for x in (DATA / "cloze.jsonl").read_text().splitlines()]
    assert 0 <= res.score <= 100 and res.predictions[0]["id"] == f"{spec}:summary"
    assert len(res.predictions) == 1 + len(docs)
    if spec == "mmcl_cloze":  # lm-eval's accuracy equals mmcl's own arg-max over option log-likelihoods
        right = 0
        for d in docs:
            lls = continuation_logprobs(model, [encode_plain(proc.tokenizer, d["context"], " " + c)
                                                for c in d["choices"]], pad_id=proc.pad_id, batch_size=4, device=CPU)
            right += d["choices"][max(range(len(lls)), key=lambda k: lls[k][0])] == d["target"]
        assert res.score == pytest.approx(100 * right / len(docs))
        assert {p["score"] for p in res.predictions[1:]} <= {0.0, 100.0}  # per document: right or wrong
        assert sum(p["score"] for p in res.predictions[1:]) / len(docs) == pytest.approx(res.score)
    elif spec == "mmcl_text":  # 100 / byte perplexity = 100 * exp(sum of log-likelihoods / sum of bytes)
        lm = language_model(model, proc, batch_size=2, device=CPU)
        texts = [f"{d['context']} {d['target']}" for d in docs]
        total = sum(lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts])))
        assert res.score == pytest.approx(100 * math.exp(total / sum(len(t.encode()) for t in texts)), rel=1e-4)
    else:  # generation: what greedy decoding wrote is in the predictions; exact match is a fraction of 3
        assert res.predictions[0]["prediction"].startswith("exact_match")
        assert round(res.score * 3 / 100, 6) in (0, 1, 2, 3)


@needs_lm_eval
def test_lm_eval_column_in_a_matrix_row(micro_overrides, tmp_path):
    from mmcl.engine.evaluation import evaluate_row

    fast = {**FAST, "eval.retention": "true"}
    ctx, _ = engine_objects(micro_overrides("lmeval", tasks=1, **fast))
    ctx.stream.retention += retention_tasks(f"lm_eval:{DATA / 'mmcl_cloze.yaml'}", tmp_path / "stream.yaml")
    scores = evaluate_row(ctx, 0, progress=False)
    assert set(scores) == {"color_qa", "lang_arith", "lm_eval-mmcl_cloze"}
    assert scores["lm_eval-mmcl_cloze"] in (0.0, pytest.approx(100 / 3, abs=1e-3), pytest.approx(200 / 3, abs=1e-3),
                                            100.0)
    preds = (ctx.run_dir / "predictions" / "row-00" / "lm_eval-mmcl_cloze.jsonl").read_text().splitlines()
    assert json.loads(preds[0])["metrics"]["acc,none"] * 100 == pytest.approx(scores["lm_eval-mmcl_cloze"], abs=1e-3)
