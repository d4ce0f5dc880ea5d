"""P3's own contributions: task similarity (by hand), TIR's importance reweighting (by hand and in the engine),
EProj's routed projector experts (routing by hand, batched equals one at a time, only the current expert trains,
routing accuracy recorded, every modality), similarity-informed expansion, and `mmcl similarity`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from support import QUIET, plant_test_record

from mmcl.cli import main
from mmcl.config import ConfigError, load_config
from mmcl.engine import loop
from mmcl.engine.setup import build_context
from mmcl.models.experts import ExpertProjector
from mmcl.strategies.similarity import (
    TaskEncoder,
    TaskEncoderOptions,
    evenly_spaced_records,
    pair_similarity,
    similarity_to_earlier,
    turn_texts,
)
from mmcl.strategies.tir import reweight

FAST = {"data.train_limit": 8, "train.batch_size": 4, "train.max_steps": 2, "data.test_limit": 4,
        "eval.max_new_tokens": 1, "eval.retention": "false"}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # restored by conftest


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# -- similarity, by hand ----------------------------------------------------------------------------------------------


def test_pair_similarity_by_hand():
    # three tasks: e1 = (1, 0), e2 = (0, 1), e3 = (1, 1). Cosines of the pairs (1,2), (1,3), (2,3): 0, 1/√2, 1/√2.
    # Their mean is √2/3 and their (unbiased) deviation 1/√6, so z = (−2/√3, 1/√3, 1/√3).
    media = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    s = pair_similarity({"media": media})
    want12, want13 = sig(-2 / math.sqrt(3)), sig(1 / math.sqrt(3))  # 0.239632, 0.640457
    assert s[0, 1] == pytest.approx(want12, abs=1e-9) and s[1, 0] == pytest.approx(want12, abs=1e-9)
    assert s[0, 2] == pytest.approx(want13, abs=1e-9) and s[1, 2] == pytest.approx(want13, abs=1e-9)
    assert torch.equal(torch.diag(s), torch.ones(3, dtype=s.dtype))
    # a second kind whose pairs are all equal: deviation 0, so every z is 0 and each pair gets sigmoid(0) = 0.5
    same = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    both = pair_similarity({"media": media, "answer": same})
    assert both[0, 1] == pytest.approx(0.5 * want12, abs=1e-9) and both[0, 2] == pytest.approx(0.5 * want13, abs=1e-9)
    # two tasks: one pair, no deviation: 0.5 per kind
    assert pair_similarity({"a": media[:2], "b": same[:2]})[0, 1] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="one embedding per task"):
        pair_similarity({"a": media, "b": same[:2]})


def test_similarity_to_earlier_is_the_new_tasks_row_standardised_over_all_pairs():
    new = {"media": torch.tensor([1.0, 1.0])}
    earlier = {"media": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    got = similarity_to_earlier(new, earlier)
    # stacked [new, e1, e2]: cos(new,e1) = cos(new,e2) = 1/√2, cos(e1,e2) = 0 -> as the hand case above, z = 1/√3
    assert got.tolist() == pytest.approx([sig(1 / math.sqrt(3))] * 2, abs=1e-9)


def test_evenly_spaced_and_turn_texts():
    from mmcl.data.records import Record

    recs = [Record(str(i), [{"from": "human", "value": f"<image>\nq{i}"}, {"from": "gpt", "value": f"a{i}"}], [],
                   {}, "t") for i in range(10)]
    assert [r.id for r in evenly_spaced_records(recs, 4)] == ["0", "2", "5", "7"]
    assert len(evenly_spaced_records(recs, 20)) == 10
    assert turn_texts(recs[3]) == ("q3", "a3")


# -- TIR --------------------------------------------------------------------------------------------------------------


def test_tir_reweight_by_hand():
    omega = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([[8.0]])}
    ids = {"w": torch.tensor([0, 1, 0, 2], dtype=torch.int16), "b": torch.tensor([[1]], dtype=torch.int16)}
    out = reweight(omega, ids, {0: 0.5, 1: 0.25, 2: 1.0})
    # each element times (1 − S of the task that supplied it): 1·0.5, 2·0.75, 3·0.5, 4·0; 8·0.75
    assert out["w"].tolist() == [0.5, 1.5, 1.5, 0.0] and out["b"].tolist() == [[6.0]]
    with pytest.raises(ValueError, match=r"no similarity for the task\(s\) \[2\]"):
        reweight(omega, ids, {0: 0.5, 1: 0.25})


@pytest.mark.integration
@pytest.mark.parametrize("name", ["tir_ewc", "tir_mas"])
def test_tir_scales_the_stored_importance_before_each_task(name, micro_overrides):
    """Task 2 starts: the importance EWC/MAS stored after task 1 is multiplied by 1 − S(task 2, task 1)."""
    cfg = load_config(None, micro_overrides(name, tasks=3, strategies=f"[{name}]", **FAST))
    ctx, strategies, _ = build_context(cfg, log=QUIET["log"])
    strategies.prepare_model(ctx)
    tir = strategies[0]
    ctx.task_index = 0
    tir.on_task_start(ctx)
    tir.on_task_end(ctx)
    before = {k: v.clone() for k, v in tir.omega.items()}
    ctx.task_index = 1
    tir.on_task_start(ctx)
    s = tir.log[-1]["similarity"]["color_qa"]
    assert 0.0 < s < 1.0
    for k, v in tir.omega.items():
        assert torch.allclose(v, before[k] * (1.0 - s), rtol=1e-6, atol=0)
    data = json.loads((ctx.run_dir / "task_similarity.json").read_text())
    assert data["tasks"] == ["color_qa", "shape_cls"] and data["matrix"][0][1] == pytest.approx(s, abs=1e-6)


def test_task_encoder_with_a_local_text_encoder_and_the_fallback(micro_overrides, tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "colour", "red", "blue",
                                "shape", "is", "the", "?"]) + "\n")
    enc_dir = tmp_path / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=13, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(enc_dir)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(enc_dir)
    ctx, _, _ = build_context(load_config(None, micro_overrides("enc", tasks=2, **FAST)), log=QUIET["log"])
    for spec, dim in ((str(enc_dir), 16), ("model", ctx.model.language_model.get_input_embeddings().embedding_dim)):
        e = TaskEncoder(TaskEncoderOptions(text_encoder=spec, max_samples=5)).embed_task(ctx, "color_qa")
        assert set(e) == {"media", "instruction", "answer"} and e["instruction"].shape == (dim,)
        assert all(abs(float(v.norm()) - 1.0) < 1e-9 for v in e.values())
    text_only = TaskEncoder(TaskEncoderOptions(text_encoder="model")).embed_task(ctx, "lang_arith", split="test")
    assert set(text_only) == {"instruction", "answer"}
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        TaskEncoder(TaskEncoderOptions(text_encoder=str(tmp_path)))


# -- EProj ------------------------------------------------------------------------------------------------------------


def _experts(n_slots=2) -> ExpertProjector:
    torch.manual_seed(0)
    base = torch.nn.Linear(2, 3)
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])  # token 0 = pad, 3 = placeholder
    proj = ExpertProjector(base, n_slots, feat_dim=2, text_table=table, ignore_ids=[0, 3])
    with torch.no_grad():
        proj.experts[1].weight.add_(1.0)  # make the experts differ
        proj.key_feat.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        proj.key_inst.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    proj.slots_in_use = [0, 1]
    return proj


def test_eproj_routes_by_hand_batched_equals_one_at_a_time():
    proj = _experts()
    feats = torch.tensor([[[1.0, 0.1], [0.9, 0.0]], [[0.0, 1.0], [0.2, 0.8]], [[1.0, 0.0], [1.0, 0.0]]])
    ids = torch.tensor([[0, 3, 1, 1], [3, 2, 2, 0], [3, 2, 0, 0]])
    # row 0: feature near key 0, instruction tokens {1} -> (1, 0): slot 0. Row 1: both point at slot 1. Row 2:
    # feature says slot 0 (cos 1 vs 0), instruction (0, 1) says slot 1 (cos 0 vs 1): a tie of 1 + 0 = 0 + 1,
    # argmax takes the first, slot 0.
    assert proj.route(feats, ids).tolist() == [0, 1, 0]
    batched = proj(feats, route_ids=ids)
    single = torch.cat([proj(feats[i : i + 1], route_ids=ids[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-7)
    assert torch.allclose(batched[1], proj.experts[1](feats[1]), atol=1e-7)
    proj.active = 1
    assert torch.allclose(proj(feats), proj.experts[1](feats), atol=1e-7)  # training: the active expert only
    proj.active, proj.slots_in_use = None, []
    assert torch.allclose(proj(feats), proj.experts[0](feats), atol=1e-7)  # before any task: the pretrained copy


def _eproj_ctx(micro_overrides, stream_tasks: int = 2, **extra):
    cfg = load_config(None, micro_overrides("eproj", tasks=stream_tasks, strategies="[eproj]", **FAST, **extra))
    ctx, strategies, _ = build_context(cfg, log=QUIET["log"])
    strategies.prepare_model(ctx)
    return ctx, strategies[0]


@pytest.mark.integration
def test_eproj_trains_only_the_current_expert_and_its_keys_move_first(micro_overrides):
    ctx, eproj = _eproj_ctx(micro_overrides, **{"strategies.eproj.key_steps": 20})
    proj = ctx.model.projectors["image"]
    assert isinstance(proj, ExpertProjector) and len(proj.experts) == 2
    keys_before = proj.key_feat.detach().clone()
    ctx.task_index = 1
    eproj.on_task_start(ctx)
    trainable = {id(p) for _, p in ctx.trainable_parameters()}
    assert trainable == {id(p) for p in proj.experts[1].parameters()}
    assert torch.equal(proj.key_feat[0], keys_before[0]) and not torch.equal(proj.key_feat[1], keys_before[1])
    assert proj.active == 1


@pytest.mark.integration
def test_eproj_runs_records_routing_and_refuses_native_backends(micro_overrides, hf_checkpoints):
    run_dir = loop.run(load_config(None, micro_overrides("eproj-run", tasks=3, strategies="[eproj]", **FAST)),
                       **QUIET)
    data = json.loads((run_dir / "eproj.json").read_text())
    assert data["slot_expert"] == [0, 1, 2] and [d["decision"] for d in data["decisions"]] == ["new"] * 3
    assert [list(r["accuracy"]) for r in data["routing_accuracy"]] == [
        ["color_qa"], ["color_qa", "shape_cls"], ["color_qa", "shape_cls", "count"]]
    assert all(0.0 <= v <= 100.0 for r in data["routing_accuracy"] for v in r["accuracy"].values())
    assert "## EProj routing" in (run_dir / "report.md").read_text()
    for family in ("llava", "qwen2_vl"):
        cfg = load_config(None, micro_overrides(f"eproj-{family}", tasks=2, strategies="[eproj]", **FAST)
                          + [f"model.path={hf_checkpoints[family]}"])
        with pytest.raises(ConfigError, match=f"'eproj' cannot run on the {family} backend: it needs projectors"):
            build_context(cfg, log=QUIET["log"])


@pytest.mark.integration
@pytest.mark.parametrize("threshold,want", [(0.0, ([0, 0, 0], ["new", "reuse", "reuse"])),
                                            (1.01, ([0, 1, 2], ["new", "new", "new"]))])
def test_similarity_informed_expansion_reuses_above_the_threshold(threshold, want, micro_overrides):
    over = {"strategies.eproj.expand": "similarity", "strategies.eproj.threshold": threshold}
    run_dir = loop.run(load_config(None, micro_overrides(f"exp-{threshold}", tasks=3, strategies="[eproj]", **FAST,
                                                         **over)), **QUIET)
    data = json.loads((run_dir / "eproj.json").read_text())
    assert (data["slot_expert"], [d["decision"] for d in data["decisions"]]) == want
    # a decision uses the similarity over the tasks embedded so far: with two tasks one pair, sigmoid(0) per kind
    # (media, instruction, answer) = 0.125; the third task's is its row in the final three-task matrix
    sims = json.loads((run_dir / "task_similarity.json").read_text())
    assert data["decisions"][1]["similarity"] == pytest.approx(0.125, abs=1e-6)
    assert data["decisions"][2]["similarity"] == pytest.approx(max(sims["matrix"][2][:2]), abs=1e-6)


@pytest.mark.integration
def test_eproj_routes_audio_and_video_projectors(micro_world, micro_overrides, tmp_path):
    from support import stream_file

    stream = stream_file(micro_world, ["audio_qa", "video_qa", "audio_cap"], tmp_path, "av")
    run_dir = loop.run(load_config(None, micro_overrides("eproj-av", tasks=1, strategies="[eproj]", **FAST)
                                   + [f"data.stream={stream}"]), **QUIET)
    data = json.loads((run_dir / "eproj.json").read_text())
    assert list(data["routing_accuracy"][-1]["accuracy"]) == ["audio_qa", "video_qa", "audio_cap"]


@pytest.mark.integration
def test_cli_similarity_prints_and_writes_the_matrix(micro_world, micro_model, tmp_path, capsys):
    from support import stream_file

    stream = stream_file(micro_world, ["color_qa", "shape_cls", "count"], tmp_path, "sim")
    out = tmp_path / "sim"
    assert main(["similarity", str(stream), f"model.path={micro_model}", "--out", str(out), "--text-encoder",
                 "model", "--max-samples", "6"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "task_similarity.json").read_text())
    m = torch.tensor(data["matrix"])
    assert data["tasks"] == ["color_qa", "shape_cls", "count"] and torch.allclose(m, m.T)
    assert torch.equal(torch.diag(m), torch.ones(3, dtype=m.dtype)) and (out / "similarity.png").is_file()
    assert "shape_cls" in printed and f"{data['matrix'][0][1]:.3f}" in printed


@pytest.mark.integration
def test_instruction_tuned_base_is_a_model_directory_that_learned_its_tasks(micro_world, micro_model, tmp_path,
                                                                            capsys):
    """`mmcl pretrain --instruct` (P3's InstructBLIP-style base): the base trained jointly on held-out world tasks
    is saved as a model directory with its scores; its weights differ from the base's, the tokenizer is kept. A
    training record that is a test record of the world (planted in image_cap) is left out and listed."""
    from safetensors.torch import load_file

    world, test_id, line = plant_test_record(micro_world, tmp_path)
    out = tmp_path / "instructed"
    assert main(["pretrain", "--instruct", "image_cap,image_qa", "--base", str(micro_model), "--world",
                 str(world), "--out", str(out), "--no-progress"]) == 0
    info = json.loads((out / "pretrain.json").read_text())
    assert info["instruct_tasks"] == ["image_cap", "image_qa"] and info["steps"] > 0
    assert [o["test"] for o in info["left_out"]] == [test_id]
    assert info["left_out"][0]["train"].endswith(f"image_cap/train.jsonl:{line}")
    lines = sum(len((world / "tasks" / t / "train.jsonl").read_text().splitlines())
                for t in ("image_cap", "image_qa", "lang_arith", "lang_facts", "lang_order"))
    assert f"on {lines - 1} records" in capsys.readouterr().out
    assert {"image_cap", "image_qa", "lang_arith"} <= set(info["scores"])
    before = load_file(str(micro_model / "projectors.safetensors"))
    after = load_file(str(out / "projectors.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == (micro_model / "tokenizer" / "tokenizer.json").read_bytes()
    assert main(["pretrain", "--instruct", "image_cap", "--world", str(micro_world), "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
