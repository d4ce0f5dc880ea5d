"""Per-parameter strategy state: its dtypes (fp32 EMA and importance even for bf16 weights), what it costs in
memory (`state_bytes`, recorded in cost.json), a teacher held in bfloat16 or on the CPU, every second a method
spends counted in cost.json, and LLaCA's adaptive weight measured per step into the run directory and the report."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from support import FAST, QUIET, engine_objects
from torch import nn

from mmcl.config import load_config
from mmcl.engine import loop
from mmcl.engine.cost import Cost, describe_state
from mmcl.strategies._importance import ImportanceRegularizer
from mmcl.strategies._teacher import TeacherOptions, _cpu_copy, make_teacher, module_bytes
from mmcl.strategies.ema import EMA, EMAOptions
from mmcl.strategies.llaca import EDGES, LLaCA, LLaCAOptions, histogram, summarise
from mmcl.strategies.lwf import LwF, LwFOptions


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _bf16_ctx(*shapes):
    model = nn.Module()
    for i, s in enumerate(shapes):
        model.register_parameter(f"w{i}", nn.Parameter(torch.ones(s, dtype=torch.bfloat16)))
    return SimpleNamespace(model=model, run_dir=None)


# -- dtypes and bytes, by hand ------------------------------------------------------------------------------------------


def test_ema_and_llaca_keep_fp32_copies_of_bf16_weights_and_count_their_bytes():
    ctx = _bf16_ctx((3,), (2, 2))  # 7 elements
    ema = EMA(EMAOptions(beta=0.99))
    ema.on_task_start(ctx)
    ema.after_optimizer_step(ctx)
    assert all(t.dtype == torch.float32 for t in ema.state_dict()[0].values())
    assert ema.state_bytes() == {"ema": 7 * 4}
    # a 1% EMA step towards a bf16 weight of 1.203125 (bf16's value nearest 1.2): 1 + 0.01 · 0.203125 = 1.00203,
    # kept in fp32, lost in bf16 (spacing 2^-7 near 1)
    with torch.no_grad():
        ctx.model.w0.fill_(1.2)
    ema.after_optimizer_step(ctx)
    assert ema.state_dict()[0]["ema/w0"][0].item() == pytest.approx(1.00203125)
    assert torch.tensor(1.00203125, dtype=torch.bfloat16).item() == 1.0

    llaca = LLaCA(LLaCAOptions())
    llaca.on_task_start(ctx)
    for p in ctx.model.parameters():
        p.grad = torch.ones_like(p)  # bf16 gradients
    llaca.after_optimizer_step(ctx)
    assert llaca.state_bytes() == {"ema": 7 * 4, "prev_grad": 7 * 2}  # previous gradients in the gradients' dtype


def test_importance_state_dtypes_and_bytes():
    s = ImportanceRegularizer()
    assert s.state_bytes() == {"omega": 0, "id": 0, "star": 0}
    s.omega = {"w": torch.zeros(5, dtype=torch.float32)}
    s.ids = {"w": torch.zeros(5, dtype=torch.int16)}
    s.star = {"w": torch.zeros(5, dtype=torch.bfloat16)}
    assert s.state_bytes() == {"omega": 20, "id": 10, "star": 10}


def test_cost_counts_strategy_seconds_in_time_per_step_and_records_state():
    cost = Cost(train_time_s=8.0, steps=4, samples=40)
    with cost.timed():
        pass
    assert 0.0 <= cost.strategy_time_s < 0.5
    cost.strategy_time_s = 2.0  # e.g. pseudo targets generated before a task
    d = cost.to_json()
    assert d["time_per_step_s"] == pytest.approx((8.0 + 2.0) / 4) and d["samples_per_s"] == pytest.approx(5.0)
    ema = EMA()
    ema._ema = {"w": torch.zeros(2**18)}  # 1 MiB
    state = cost.record_state("t1", [ema, LwF()])
    assert state == {"ema": {"ema": 2**20}, "lwf": {"teacher": 0}}
    assert cost.to_json()["strategy_state_bytes"] == {"t1": state}
    assert describe_state(state) == "ema: ema 1.0 MiB; lwf: teacher 0.0 MiB"
    restored = Cost(**{k: v for k, v in d.items() if k in Cost.__dataclass_fields__})  # as a resume does
    assert restored.strategy_time_s == 2.0


# -- the teacher ------------------------------------------------------------------------------------------------------


def test_cpu_copy_makes_independent_cpu_tensors_and_keeps_ties():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight  # tied
    copy = _cpu_copy(model)
    assert copy[1].weight is copy[0].weight and copy[0].weight is not model[0].weight
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(copy[0].weight, model[0].weight)
    assert all(p.device.type == "cpu" and not p.requires_grad for p in copy.parameters())


def test_teacher_in_bf16_or_on_cpu_is_smaller_or_off_the_device_and_distils_the_same(micro_overrides):
    """A teacher copied from the model as it is: KD is 0 for an exact copy (model dtype, on the model's device or
    the CPU) and ~0 for a bf16 copy, whose weights take half the bytes."""
    ctx, _ = engine_objects(micro_overrides("teacher", tasks=2, strategies="[lwf]", **FAST))
    ctx.task_index = 1
    batch = next(ctx.batches(ctx.train_examples(ctx.task.name)[:4], 4))
    losses, sizes = {}, {}
    for label, options in {"model": TeacherOptions(), "bf16": TeacherOptions(dtype="bfloat16"),
                           "cpu": TeacherOptions(device="cpu"),
                           "bf16-cpu": TeacherOptions(dtype="bfloat16", device="cpu")}.items():
        s = LwF(LwFOptions(teacher=options))
        s.teacher = make_teacher(ctx, options)
        assert all(not p.requires_grad for p in s.teacher.parameters()) and not s.teacher.training
        first = next(s.teacher.parameters())
        assert first.dtype == (torch.bfloat16 if "bf16" in label else torch.float32)
        if "cpu" in label:
            assert first.device.type == "cpu"
        with torch.no_grad():
            out = ctx.forward(batch)
            losses[label] = s.extra_loss(ctx, batch, out)
        sizes[label] = s.state_bytes()["teacher"]
        assert losses[label].device == out.logits.device
    assert losses["model"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["cpu"].item() == pytest.approx(0.0, abs=1e-6)
    assert 0.0 <= losses["bf16"].item() < 1e-3 and losses["bf16-cpu"].item() == pytest.approx(losses["bf16"].item())
    fp32 = module_bytes(ctx.model)
    assert sizes["model"] == sizes["cpu"] == fp32
    assert sizes["bf16"] == sizes["bf16-cpu"] == pytest.approx(fp32 / 2, rel=0.01)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading the teacher needs an accelerator")
def test_cpu_teacher_of_a_gpu_model_takes_no_device_memory_and_distils_the_same(micro_overrides):
    ctx, _ = engine_objects(micro_overrides("offload", tasks=2, strategies="[lwf]", **FAST))
    ctx.task_index = 1
    batch = next(ctx.batches(ctx.train_examples(ctx.task.name)[:4], 4))
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    near = make_teacher(ctx, TeacherOptions())
    grew = torch.cuda.memory_allocated() - start
    far = make_teacher(ctx, TeacherOptions(device="cpu"))
    assert grew >= module_bytes(ctx.model) and torch.cuda.memory_allocated() - start == grew  # the CPU copy: 0
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device))
        out = ctx.forward(batch)
        kd = []
        for t in (near, far):
            s = LwF()
            s.teacher = t
            kd.append(s.extra_loss(ctx, batch, out).item())
    assert kd[0] > 1e-3 and kd[1] == pytest.approx(kd[0], rel=1e-4)


def test_bf16_teacher_kd_after_training_matches_fp32_within_tolerance(micro_overrides):
    """A student that differs from its teacher: the KD term with a bf16 teacher is within 2% of the fp32 one."""
    ctx, _ = engine_objects(micro_overrides("teacher2", tasks=2, strategies="[lwf]", **FAST))
    ctx.task_index = 1
    batch = next(ctx.batches(ctx.train_examples(ctx.task.name)[:4], 4))
    teachers = {k: make_teacher(ctx, TeacherOptions(dtype=k)) for k in ("model", "bfloat16")}
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in ctx.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        out = ctx.forward(batch)
        kd = {}
        for k, t in teachers.items():
            s = LwF()
            s.teacher = t
            kd[k] = s.extra_loss(ctx, batch, out).item()
    assert kd["model"] > 1e-3
    assert kd["bfloat16"] == pytest.approx(kd["model"], rel=0.02)


# -- LLaCA's weight log -------------------------------------------------------------------------------------------------


def test_weight_histogram_and_summary_by_hand():
    assert len(EDGES) == 13 and EDGES[0] == pytest.approx(1e-6) and EDGES[-1] == 1.0
    # 0.01 = 10^-2 is the left edge of bin 8 ([1e-2, 10^-1.5)); 0.5 is in the last bin [10^-0.5, 1); 1e-9 -> bin 0
    counts = histogram([0.01, 0.5, 1e-9, 0.02])
    assert counts[8] == 2 and counts[11] == 1 and counts[0] == 1 and sum(counts) == 4
    line = {"tensors": 2, "fallback": 1, "min": 0.01, "max": 0.5, "counts": [0] * 12}
    lines = [dict(line, task="a", step=1, sum=0.51), dict(line, task="a", step=2, sum=0.2, max=0.19),
             dict(line, task="a", step=2, sum=0.3, max=0.29),  # step 2 logged again after a resume: the last counts
             dict(line, task="b", step=1, sum=0.02, fallback=2)]
    s = summarise(lines)
    assert s["a"]["steps"] == 2 and s["a"]["weights"] == 4 and s["a"]["fallback_share"] == 0.5
    assert s["a"]["mean"] == pytest.approx((0.51 + 0.3) / 4) and s["a"]["max"] == 0.5
    assert s["b"]["fallback_share"] == 1.0


def test_llaca_logs_its_weight_every_step_and_the_report_shows_the_distribution(micro_overrides, tmp_path):
    from mmcl.report.strategy_sections import llaca_section

    cfg = load_config(None, micro_overrides("llaca-log", tasks=2, strategies="[lora,llaca]", **FAST))
    run = loop.run(cfg, **QUIET)
    lines = [json.loads(x) for x in (run / "llaca_weights.jsonl").read_text().splitlines()]
    assert [(x["task"], x["step"]) for x in lines] == [("color_qa", 1), ("color_qa", 2), ("shape_cls", 1),
                                                       ("shape_cls", 2)]
    n = lines[0]["tensors"]
    assert n > 0 and all(x["tensors"] == n and sum(x["counts"]) == n for x in lines)
    assert lines[0]["fallback"] == n and lines[0]["min"] == lines[0]["max"] == 0.01  # first step: no g_prev
    assert all(0.0 < x["min"] <= x["max"] < 1.0 for x in lines)
    summary = json.loads((run / "llaca_weights.json").read_text())
    assert set(summary) == {"color_qa", "shape_cls"} and summary["color_qa"]["weights"] == 2 * n
    assert summary == summarise(lines)
    pieces = llaca_section(run)
    assert ("img", "plots/llaca_weights.png") in pieces and (run / "plots" / "llaca_weights.png").is_file()
    table = next(c for k, c in pieces if k == "table")
    assert "fallback to base (%)" in table.markdown() and "shape_cls" in table.markdown()
    assert llaca_section(tmp_path) == []  # a run without LLaCA has no section


def test_cost_json_counts_pseudo_target_generation_and_the_teachers_bytes(micro_world, micro_overrides, monkeypatch,
                                                                          tmp_path):
    """MoInCL on [caption, color_qa]: the teacher captions color_qa's inputs before the task; those seconds are in
    cost.json's strategy_time_s and in s/step, and the teacher's bytes in strategy_state_bytes."""
    from support import fast_engine, stream_file

    from mmcl.strategies.moincl import MoInCL

    fast_engine(monkeypatch)
    spent: list[float] = []
    real = MoInCL.train_examples

    def timed(self, ctx, examples):  # the real hook, timed from outside
        import time

        t = time.perf_counter()
        out = real(self, ctx, examples)
        spent.append(time.perf_counter() - t)
        return out

    monkeypatch.setattr(MoInCL, "train_examples", timed)
    stream = stream_file(micro_world, ["caption", "color_qa"], tmp_path)
    cfg = load_config(None, micro_overrides("moincl-cost", tasks=1, strategies="[moincl]", **FAST)
                      + [f"data.stream={stream}", "strategies.moincl.ikd=false"])
    run = loop.run(cfg, **QUIET)
    cost = json.loads((run / "cost.json").read_text())
    assert len(spent) == 2 and spent[1] > spent[0]  # the second task generated pseudo captions
    assert cost["strategy_time_s"] >= sum(spent)
    assert cost["time_per_step_s"] == pytest.approx((cost["train_time_s"] + cost["strategy_time_s"]) / cost["steps"])
    state = cost["strategy_state_bytes"]
    assert state["caption"]["moincl"]["teacher"] == 0  # no teacher on the first task
    teacher = state["color_qa"]["moincl"]["teacher"]
    fp32 = cost["total_parameters"] * 4  # an fp32 copy of every parameter (+ the model's few buffers)
    assert fp32 <= teacher < 1.01 * fp32
