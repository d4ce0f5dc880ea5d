"""The contract every registered strategy keeps: it runs through the real engine across a task boundary, leaves
every trainable parameter with a finite gradient, round-trips its state through safetensors, and is
deterministic under a fixed seed. Plus the exact order in which the engine calls the hooks.

A new strategy must add a row to CASES in tests/support.py (a test fails until it does)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import AUDIO_TASKS, BACKENDS, CASES, FAST, QUIET, engine_objects, fast_engine, overrides_for

from mmcl.config import ConfigError, load_config
from mmcl.engine import loop, setup
from mmcl.engine.context import Context
from mmcl.engine.setup import build_context
from mmcl.models.losses import token_cross_entropy_sum
from mmcl.strategies import Strategy, build_strategies, get_strategy, list_strategies, register_strategy
from mmcl.strategies.registry import _REGISTRY

pytestmark = pytest.mark.integration

@pytest.fixture(autouse=True)
def _one_thread():
    """Micro models run fastest on one thread; with several, OpenMP spin-waits dominate on a busy machine (the
    conftest fixture restores the thread count afterwards)."""
    torch.set_num_threads(1)


def one_backward(ctx: Context, strategies: list[Strategy]) -> None:
    """Task 0, one batch, forward and backward of the loss the engine would build (task loss + extra terms)."""
    ctx.task_index = 0
    strategies.on_task_start(ctx)
    examples = ctx.train_examples(ctx.task.name)[:4]
    batch = next(ctx.batches(examples, len(examples)))
    hooks = strategies.step_hooks(ctx)
    batch = hooks.transform_batch(batch)
    ctx.model.train()
    out = ctx.forward(batch)
    loss = hooks.task_loss(batch, out)
    if loss is None:
        loss = token_cross_entropy_sum(out.logits, batch.labels)
    extra = hooks.extra_loss(batch, out)
    (loss + (extra if extra is not None else 0)).backward()


def _roundtrip(strategy: Strategy, where: Path) -> None:
    tensors, meta = strategy.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    json.dumps(meta)  # JSON-able
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(where))
    fresh = type(strategy)(strategy.config)
    fresh.load_state_dict(load_file(str(where)), json.loads(json.dumps(meta)))
    tensors2, meta2 = fresh.state_dict()
    assert tensors2.keys() == tensors.keys()
    assert all(torch.equal(tensors[k], tensors2[k]) and tensors[k].dtype == tensors2[k].dtype for k in tensors)
    assert meta2 == meta


def test_every_registered_strategy_has_a_contract_case():
    missing = [n for n in list_strategies() if n not in CASES]
    assert not missing, f"add a row to CASES in {Path(__file__).with_name('support.py')} for {missing}"


@pytest.mark.parametrize("name", list_strategies())
@pytest.mark.parametrize("backend", BACKENDS)
def test_strategy_contract(backend, name, micro_overrides, backend_overrides, monkeypatch, tmp_path):
    """Every strategy on every backend (the built-in composition and each native Hugging Face family): finite
    gradients for every trainable parameter, two tasks through the real engine with the same losses per seed, and
    a state round trip. A strategy a backend cannot serve must be refused before training instead."""
    if name not in CASES:
        pytest.fail(f"no CASES row for {name!r}")
    fast_engine(monkeypatch)
    on = backend_overrides(backend)
    needs = get_strategy(name).requires_model
    if needs and backend != "mmcl":  # only the composition has what such a strategy needs (routable projectors)
        with pytest.raises(ConfigError, match=f"'{name}' cannot run on the {backend} backend: it needs"):
            engine_objects(overrides_for(micro_overrides, f"{name}-refused", name, backend=on))
        return

    # 1. every trainable parameter gets a finite gradient
    ctx, strategies = engine_objects(overrides_for(micro_overrides, f"{name}-g", name, backend=on))
    one_backward(ctx, strategies)
    trainable = ctx.trainable_parameters()  # as the task trains them (a strategy may choose them at task start)
    assert trainable
    bad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, f"no or non-finite gradient: {bad[:5]}"

    # 2. two tasks of two steps through the real engine, twice with the same seed
    built: list[list[Strategy]] = []

    def capture(specs):
        built.append(build_strategies(specs))
        return built[-1]

    monkeypatch.setattr(setup, "build_strategies", capture)
    dirs = [loop.run(load_config(None, overrides_for(micro_overrides, f"{name}-0", name, backend=on)), **QUIET)]
    # the repeat only compares losses and state: skip its evaluation
    monkeypatch.setattr(loop, "evaluate_row", lambda ctx, row, progress: {t.name: 0.0 for t in ctx.stream.tasks})
    dirs.append(loop.run(load_config(None, overrides_for(micro_overrides, f"{name}-1", name, backend=on)), **QUIET))
    losses = [json.loads((d / "losses.json").read_text()) for d in dirs]
    assert list(losses[0]) == (AUDIO_TASKS if backend == "qwen2_audio" else ["color_qa", "shape_cls"])
    assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in losses[0].values())
    assert losses[0] == losses[1], "the same seed gave different losses"

    # 3. state round trip through safetensors + JSON, and the same state in both runs
    for s1, s2 in zip(*built):
        _roundtrip(s1, tmp_path / f"{s1.name}.safetensors")
        t1, m1 = s1.state_dict()
        t2, m2 = s2.state_dict()
        assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1) and m1 == m2


# -- the order of hook calls ------------------------------------------------------------------------------------------

HOOKS = ["prepare_model", "on_task_start", "train_examples", "transform_batch", "task_loss", "extra_loss",
         "after_optimizer_step", "on_epoch_end", "on_task_end", "state_dict", "load_state_dict"]


@pytest.fixture
def recorder():
    calls: list[str] = []

    class Recorder(Strategy):
        """Records every hook call (test only)."""

    def recording(hook):
        base = getattr(Strategy, hook)

        def method(self, *args):
            calls.append(hook)
            return base(self, *args)

        return method

    for hook in HOOKS:
        setattr(Recorder, hook, recording(hook))
    register_strategy("recorder_test")(Recorder)
    yield calls
    _REGISTRY.pop("recorder_test", None)


def test_hooks_are_called_in_the_documented_order(recorder, micro_overrides, monkeypatch):
    fast_engine(monkeypatch)
    overrides = micro_overrides("order", tasks=2, strategies="[recorder_test]", **FAST, **{"train.grad_accum": 1})
    loop.run(load_config(None, overrides), **QUIET)
    step = ["transform_batch", "task_loss", "extra_loss", "after_optimizer_step"]
    task = ["on_task_start", "train_examples", *step, *step, "on_epoch_end", "on_task_end", "state_dict"]
    assert recorder == ["prepare_model", *task, *task]


# -- per-task options and the epoch hook ------------------------------------------------------------------------------


@dataclass
class _Knob:
    value: float = 1.0
    fixed: int = 0


@pytest.fixture
def knob():
    """A test strategy with one per-task option; records the value in force at each hook."""
    seen: list[tuple[str, str, float]] = []

    class Knob(Strategy):
        """Records its option (test only)."""

        Config = _Knob
        task_options = frozenset({"value"})

        def on_task_start(self, ctx):
            seen.append(("start", ctx.task.name, self.config.value))

        def on_epoch_end(self, ctx):
            seen.append(("epoch", ctx.task.name, self.config.value))

    register_strategy("knob_test")(Knob)
    yield seen
    _REGISTRY.pop("knob_test", None)


def test_per_task_options_are_in_force_during_their_task_only(knob, micro_overrides, monkeypatch):
    fast_engine(monkeypatch)
    overrides = micro_overrides("knob", tasks=3, strategies="[knob_test]",
                                **FAST | {"strategies.knob_test.per_task.shape_cls.value": 2.5, "train.max_steps": 5,
                                          "train.epochs": 3})
    cfg = load_config(None, overrides)
    assert cfg.strategies[0].options == {"per_task": {"shape_cls": {"value": 2.5}}}
    loop.run(cfg, **QUIET)
    # 8 records in batches of 4: epochs end after steps 2 and 4, and the third, cut short by max_steps, after 5
    want = []
    for task, value in (("color_qa", 1.0), ("shape_cls", 2.5), ("count", 1.0)):
        want += [("start", task, value)] + [("epoch", task, value)] * 3
    assert knob == want


def test_per_task_options_are_checked_before_training(knob, micro_overrides):
    base = micro_overrides("knob-bad", tasks=2, strategies="[knob_test]", **FAST)
    with pytest.raises(ConfigError, match=r"per_task\.shape_cls\.fixed: 'knob_test' reads this option once.*value"):
        build_strategies(load_config(None, [*base, "strategies.knob_test.per_task.shape_cls.fixed=3"]).strategies)
    with pytest.raises(ConfigError, match=r"per_task\.shape_cls\.value: expected a number"):
        build_strategies(load_config(None, [*base, "strategies.knob_test.per_task.shape_cls.value=abc"]).strategies)
    unknown_task = r"per_task\.ocr: no such task in the stream; its tasks: color_qa, shape_cls"
    with pytest.raises(ConfigError, match=unknown_task):
        build_context(load_config(None, [*base, "strategies.knob_test.per_task.ocr.value=2"]),
                           log=QUIET["log"])
    with pytest.raises(ConfigError, match=r"per_task\.color_qa\.x: unknown key"):
        build_strategies(load_config(None, [*base, "strategies=[{knob_test: {per_task: {color_qa: {x: 1}}}}]"])
                         .strategies)
    with pytest.raises(ConfigError, match=r"per_task: expected a mapping of task name to options"):
        build_strategies(load_config(None, [*base, "strategies=[{knob_test: {per_task: [1]}}]"]).strategies)
