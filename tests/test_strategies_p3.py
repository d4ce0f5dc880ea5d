"""P3's baselines: EWC, MAS (importance, normalisation, max-merge with the Id map, the penalty), LwF, replay."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from support import QUIET

from mmcl.config import load_config
from mmcl.engine import loop
from mmcl.engine.loop import run
from mmcl.engine.setup import build_context
from mmcl.strategies import get_strategy
from mmcl.strategies._importance import (
    ImportanceError,
    ImportanceOptions,
    evenly_spaced,
    importance_pass,
    merge_max,
    normalise,
)
from mmcl.strategies.lwf import LwFOptions, distillation_loss
from mmcl.strategies.replay import ReplayOptions, quotas, reservoir_offer

FAST = {"train.max_steps": 2, "data.test_limit": 2, "eval.max_new_tokens": 2, "eval.retention": "false"}


def make_ctx(overrides: list[str]):
    """The Context `loop.run` builds, without running anything (for hook-level tests on the micro model)."""
    ctx, _, _ = build_context(load_config(None, overrides), log=lambda *a: None)
    ctx.task_index = 0
    return ctx


def latest(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


def train_ids(micro_world: Path, task: str) -> set[str]:
    lines = (micro_world / "tasks" / task / "train.jsonl").read_text().splitlines()
    return {json.loads(line)["id"] for line in lines if line.strip()}


# -- pure functions, by hand ------------------------------------------------------------------------------------


def test_normalise_by_hand():
    imp = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([[0.0, 4.0]])}
    out = normalise(imp, "t")
    assert torch.equal(out["a"], torch.tensor([0.125, 0.375])) and torch.equal(out["b"], torch.tensor([[0.0, 0.5]]))
    zero = normalise({"a": torch.zeros(3)}, "t")
    assert torch.equal(zero["a"], torch.zeros(3))
    with pytest.raises(ImportanceError, match=r"task 'ocr': importance is not finite.*'b'"):
        normalise({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}, "ocr")
    with pytest.raises(ImportanceError, match="not finite"):
        normalise({"a": torch.tensor([float("inf")])}, "x")


def test_merge_max_and_id_map_by_hand():
    first, ids = merge_max(None, None, {"w": torch.tensor([0.5, 0.1, 0.2, 0.2])}, 0)
    assert torch.equal(first["w"], torch.tensor([0.5, 0.1, 0.2, 0.2]))
    assert ids["w"].tolist() == [0, 0, 0, 0] and ids["w"].dtype == torch.int16
    merged, ids = merge_max(first, ids, {"w": torch.tensor([0.2, 0.3, 0.2, 0.1])}, 1)
    assert torch.equal(merged["w"], torch.tensor([0.5, 0.3, 0.2, 0.2]))
    assert ids["w"].tolist() == [0, 1, 0, 0]  # the tie (0.2 vs 0.2) keeps the older task
    merged, ids = merge_max(merged, ids, {"w": torch.tensor([0.0, 0.0, 0.9, 0.0])}, 2)
    assert torch.equal(merged["w"], torch.tensor([0.5, 0.3, 0.9, 0.2])) and ids["w"].tolist() == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="changed shape"):
        merge_max(merged, ids, {"w": torch.zeros(3)}, 3)


def test_evenly_spaced():
    assert evenly_spaced(list(range(10)), 4) == [0, 2, 5, 7]
    assert evenly_spaced(list(range(3)), None) == [0, 1, 2]


def test_options_are_validated_with_the_option_named():
    with pytest.raises(ValueError, match="lambda_"):
        ImportanceOptions(lambda_=-1.0)
    with pytest.raises(ValueError, match="batch_size"):
        ImportanceOptions(batch_size=0)
    with pytest.raises(ValueError, match="temperature"):
        LwFOptions(temperature=0.0)
    with pytest.raises(ValueError, match="size"):
        ReplayOptions(size=0)
    with pytest.raises(ValueError, match="policy"):
        ReplayOptions(policy="fifo")  # type: ignore[arg-type]


def test_capability_flags():
    assert get_strategy("lwf").needs_teacher and not get_strategy("ewc").needs_teacher
    for name in ("ewc", "mas", "lwf", "replay"):
        cls = get_strategy(name)
        assert cls.supports_full and cls.supports_peft and not cls.provides_peft and not cls.replaces_task_loss
        assert "P3" in cls.__doc__ and "State" in cls.__doc__


def test_ewc_penalty_by_hand_and_state_round_trip():
    p1, p2 = torch.nn.Parameter(torch.tensor([1.0])), torch.nn.Parameter(torch.tensor([-2.0]))
    ctx = SimpleNamespace(trainable_parameters=lambda: [("p1", p1), ("p2", p2)])
    ewc = get_strategy("ewc")(ImportanceOptions(lambda_=3.0, scale_by_numel=False))
    assert ewc.extra_loss(ctx, {}, None) is None  # nothing before the first task ends
    ewc.omega = {"p1": torch.tensor([0.2]), "p2": torch.tensor([0.8])}
    ewc.ids = {"p1": torch.tensor([0], dtype=torch.int16), "p2": torch.tensor([0], dtype=torch.int16)}
    ewc.star = {"p1": torch.tensor([0.5]), "p2": torch.tensor([0.0])}
    ewc.tasks = ["a"]
    ewc.on_task_start(ctx)
    pen = ewc.extra_loss(ctx, {}, None)
    assert pen.item() == pytest.approx(3.0 * (0.2 * 0.5**2 + 0.8 * 2.0**2))  # 9.75
    pen.backward()
    assert p1.grad.item() == pytest.approx(2 * 3.0 * 0.2 * 0.5)
    assert p2.grad.item() == pytest.approx(2 * 3.0 * 0.8 * -2.0)

    scaled = get_strategy("ewc")(ImportanceOptions(lambda_=3.0))  # λ·N, N = 2 elements
    tensors, meta = ewc.state_dict()
    assert set(tensors) == {"omega/p1", "omega/p2", "id/p1", "id/p2", "star/p1", "star/p2"}
    scaled.load_state_dict(tensors, json.loads(json.dumps(meta)))
    scaled.on_task_start(ctx)
    assert scaled.extra_loss(ctx, {}, None).item() == pytest.approx(2 * 9.75)
    t2, m2 = scaled.state_dict()
    assert m2 == meta and all(torch.equal(t2[k], tensors[k]) for k in tensors)


# -- importance on the micro model -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ewc", "mas"])
def test_importance_pass_on_the_micro_model(micro_overrides, kind):
    ctx = make_ctx(micro_overrides(f"imp-{kind}", tasks=1))
    named = ctx.trainable_parameters()
    before = {n: p.detach().clone() for n, p in named}
    ctx.model.train()
    raw = importance_pass(ctx, ctx.train_examples("color_qa"), kind, batch_size=4, max_samples=8)
    assert ctx.model.training  # mode restored
    imp = normalise(raw, "color_qa")
    assert list(imp) == [n for n, _ in named]
    for n, p in named:
        assert imp[n].shape == p.shape and imp[n].dtype == torch.float32
        assert torch.isfinite(imp[n]).all() and (imp[n] >= 0).all()
        assert p.grad is None and torch.equal(p, before[n])
    assert sum(float(v.double().sum()) for v in imp.values()) == pytest.approx(1.0, abs=1e-6)
    assert sum(int((v > 0).sum()) for v in imp.values()) > 0


def test_non_finite_importance_raises_and_leaves_weights_untouched(micro_overrides):
    ctx = make_ctx(micro_overrides("nan", tasks=1))
    ewc = get_strategy("ewc")(ImportanceOptions(max_samples=8))
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    head = ctx.model.language_model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, i, o: o * float("nan"))
    try:
        with pytest.raises(ImportanceError, match="'color_qa': importance is not finite"):
            ewc.on_task_end(ctx)
    finally:
        handle.remove()
    after = ctx.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert ewc.omega is None and ewc.star is None and ewc.tasks == []


# -- LwF ---------------------------------------------------------------------------------------------------------


def test_distillation_loss_by_hand():
    labels = torch.tensor([[-100, 5, -100]])  # only position 0 predicts a supervised token
    s = torch.tensor([[[0.0, 0.0], [9.0, 9.0], [1.0, 1.0]]])
    t = torch.tensor([[[0.0, 2.0], [-9.0, 9.0], [3.0, 1.0]]])
    p = torch.softmax(torch.tensor([0.0, 1.0]), -1)  # teacher at T=2
    want = 4.0 * float((p * (p / 0.5).log()).sum())
    assert distillation_loss(s, t, labels, 2.0).item() == pytest.approx(want, rel=1e-5)
    assert distillation_loss(s, t, torch.full((1, 3), -100), 2.0).item() == 0.0


def test_lwf_distillation_is_zero_when_teacher_equals_student(micro_overrides):
    ctx = make_ctx(micro_overrides("lwf", tasks=2))
    lwf = get_strategy("lwf")()
    lwf.on_task_start(ctx)
    assert lwf.teacher is None  # first task: no teacher
    ctx.task_index = 1
    lwf.on_task_start(ctx)
    assert lwf.teacher is not None and not lwf.teacher.training
    assert all(not p.requires_grad for p in lwf.teacher.parameters())
    ctx.model.eval()
    batch = next(ctx.batches(ctx.train_examples("shape_cls"), 4))
    out = ctx.forward(batch)
    assert abs(lwf.extra_loss(ctx, batch, out).item()) < 1e-6
    with torch.no_grad():
        next(iter(ctx.model.projectors.parameters())).add_(0.5)
    assert lwf.extra_loss(ctx, batch, ctx.forward(batch)).item() > 1e-6
    lwf.on_task_end(ctx)
    assert lwf.teacher is None and lwf.state_dict() == ({}, {})


# -- replay ------------------------------------------------------------------------------------------------------


def test_quotas_and_reservoir():
    assert quotas(7, 2) == [4, 3] and quotas(5, 3) == [2, 2, 1] and quotas(1, 2) == [1, 0]
    items = [("a", str(i)) for i in range(50)]
    g = torch.Generator().manual_seed(0)
    mem, seen = reservoir_offer([], 0, items, 8, g)
    assert len(mem) == 8 and seen == 50 and len(set(mem)) == 8
    mem2, _ = reservoir_offer([], 0, items, 8, torch.Generator().manual_seed(0))
    assert mem == mem2
    mem3, seen = reservoir_offer(mem, seen, [("b", str(i)) for i in range(50)], 8, g)
    assert len(mem3) == 8 and seen == 100 and len(set(mem3)) == 8
    # algorithm R is uniform: over many seeds each of 20 items is kept ~ size/seen = 1/4 of the time
    hits = torch.zeros(20)
    for s in range(400):
        m, _ = reservoir_offer([], 0, [("a", str(i)) for i in range(20)], 5, torch.Generator().manual_seed(s))
        for _, i in m:
            hits[int(i)] += 1
    assert ((hits / 400 - 0.25).abs() < 0.1).all()


def test_regularizers_lwf_and_reservoir_replay_run_and_resume_exactly(micro_overrides, micro_world, monkeypatch):
    """One run of [replay, lwf, ewc] dies while writing its task-2 checkpoint (so everything task 2 computed is
    captured); the resumed run redoes task 2 from the task-1 checkpoint and must write bitwise the same state."""
    extra = dict(FAST, strategies="[replay,lwf,ewc]", **{
        "strategies.replay.policy": "reservoir", "strategies.replay.size": 10, "strategies.ewc.max_samples": 8})
    captured = {}
    real = loop.ck.save_checkpoint

    def dying(root, name, tensors, state, **kwargs):
        if name.startswith("task-02"):
            captured["tensors"] = {g: {k: v.detach().clone() for k, v in t.items()} for g, t in tensors.items()}
            captured["state"] = json.loads(json.dumps(state))
            raise KeyboardInterrupt("simulated crash")
        return real(root, name, tensors, state, **kwargs)

    monkeypatch.setattr(loop.ck, "save_checkpoint", dying)
    cfg = load_config(None, micro_overrides("cut", tasks=2, **extra))
    with pytest.raises(KeyboardInterrupt):
        run(cfg, **QUIET)
    assert latest(cfg.run_dir).name == "task-01-color_qa"
    first = json.loads((latest(cfg.run_dir) / "state.json").read_text())["strategies"]
    assert len(first["replay"]["memory"]) == 10 and first["replay"]["seen"] == 24 and first["lwf"] == {}

    tensors, state = captured["tensors"]["strategies"], captured["state"]
    omega = {k: v for k, v in tensors.items() if k.startswith("ewc/omega/")}
    assert omega and {k.split("/")[0] for k in tensors} == {"ewc"}  # lwf and replay keep no tensors
    assert {k.replace("omega", part, 1) for k in omega for part in ("id", "star")} <= set(tensors)
    assert all(torch.isfinite(v).all() for v in omega.values())
    assert sum(float(v.sum()) for v in omega.values()) >= 1.0 - 1e-5  # max of two sum-1 importances
    assert {int(x) for k, v in tensors.items() if k.startswith("ewc/id/") for x in v.unique()} <= {0, 1}
    assert state["strategies"]["ewc"]["tasks"] == ["color_qa", "shape_cls"]
    memory = state["strategies"]["replay"]["memory"]
    assert len(memory) == 10 and state["strategies"]["replay"]["seen"] == 48
    for task, id_ in memory:
        assert id_ in train_ids(micro_world, task)

    monkeypatch.setattr(loop.ck, "save_checkpoint", real)
    resumed = run(cfg, resume=True, **QUIET)
    ckpt = latest(resumed)
    assert ckpt.name == "task-02-shape_cls"
    state2 = json.loads((ckpt / "state.json").read_text())
    assert state2["strategies"] == state["strategies"]
    t2, w2 = load_file(str(ckpt / "strategies.safetensors")), load_file(str(ckpt / "model.safetensors"))
    assert t2.keys() == tensors.keys() and all(torch.equal(t2[k], tensors[k]) for k in tensors)
    weights = captured["tensors"]["model"]
    assert w2.keys() == weights.keys() and all(torch.equal(w2[k], weights[k]) for k in weights)


def test_mas_and_quota_replay_run(micro_overrides, micro_world):
    extra = dict(FAST, strategies="[mas,replay]", **{"strategies.replay.size": 7, "strategies.mas.max_samples": 8})
    run_dir = run(load_config(None, micro_overrides("mq", tasks=2, **extra)), **QUIET)
    ckpts = run_dir / "checkpoints"
    first = json.loads((ckpts / "task-01-color_qa" / "state.json").read_text())["strategies"]["replay"]
    assert [t for t, _ in first["memory"]] == ["color_qa"] * 7
    ckpt = latest(run_dir)
    state = json.loads((ckpt / "state.json").read_text())
    memory = state["strategies"]["replay"]["memory"]
    assert [t for t, _ in memory] == ["color_qa"] * 4 + ["shape_cls"] * 3  # quotas(7, 2)
    assert [i for _, i in memory[:4]] == [i for _, i in first["memory"][:4]]  # the older share is trimmed, not redrawn
    assert len({i for _, i in memory}) == 7
    for task, id_ in memory:
        assert id_ in train_ids(micro_world, task)
    tensors = load_file(str(ckpt / "strategies.safetensors"))
    assert tensors and all(k.startswith("mas/") for k in tensors)
    assert state["strategies"]["mas"]["tasks"] == ["color_qa", "shape_cls"]
    cost = json.loads((run_dir / "cost.json").read_text())
    assert cost["steps"] == 4

    replay = get_strategy("replay")(ReplayOptions(size=7))
    replay.load_state_dict({}, json.loads(json.dumps(state["strategies"]["replay"])))
    assert replay.state_dict() == ({}, state["strategies"]["replay"])
    assert replay.counts() == {"color_qa": 4, "shape_cls": 3}
