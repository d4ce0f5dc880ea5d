"""Test-only pieces shared by the reliability tests (tests/test_reliability_*.py) and by the child processes they
launch: a `Probe` strategy that records which samples each step consumed and injects a fault at a chosen task and
step, and helpers to compare run directories and checkpoints.

The probe is registered by a fixture (and popped afterwards), never at import, so the registry-wide contract test
does not see it. A child process registers it itself (see reliability_child.py).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmcl.engine import checkpoint as ck
from mmcl.strategies import Strategy

PROBE = "probe_test"


class Probe(Strategy):
    """Records the ids of every training batch in its JSON state; optionally injects one fault (test only).

    `Probe.plan` (class attribute, set by a test) may hold:
      fail: {"hook": name, "task": i, "step": k}   raise RuntimeError("boom") from that hook
      sigterm: [[task, step], ...]                 os.kill(self, SIGTERM) in after_optimizer_step at those steps
      nonfinite: {"task": i, "steps": [k, ...] | "all", "value": "nan" | "inf"}   poison the loss (extra_loss)
    Steps are 0-based indices of the batches drawn in a task (a skipped step counts too), taken from the recorded
    ids, so they survive a resume. `snapshots` holds the trainable weights at the start of every step.
    """

    plan: dict = {}
    instances: list[Probe] = []

    def __init__(self, config=None):
        super().__init__(config)
        self.seen: list[list] = []  # [task_index, [ids...]] per training batch, in order
        self.ctx = None  # the engine's context, from on_task_start
        self.snapshots: list[tuple[int, int, dict[str, torch.Tensor]]] = []
        Probe.instances.append(self)

    def _step(self, ctx) -> int:
        return sum(1 for t, _ in self.seen if t == ctx.task_index) - 1

    def _maybe_fail(self, hook: str, ctx, step: int | None = None) -> None:
        f = self.plan.get("fail")
        if f and f["hook"] == hook and f["task"] == ctx.task_index and (step is None or f.get("step") in (None, step)):
            raise RuntimeError("boom")

    def on_task_start(self, ctx) -> None:
        self.ctx = ctx
        self._maybe_fail("on_task_start", ctx)

    def transform_batch(self, ctx, batch: dict) -> dict:
        self.seen.append([ctx.task_index, list(batch.ids)])
        step = self._step(ctx)
        if self.plan.get("snapshot"):
            weights = {n: p.detach().clone() for n, p in ctx.trainable_parameters()}
            self.snapshots.append((ctx.task_index, step, weights))
        self._maybe_fail("transform_batch", ctx, step)
        return batch

    def extra_loss(self, ctx, batch: dict, outputs):
        step = self._step(ctx)
        self._maybe_fail("extra_loss", ctx, step)
        bad = self.plan.get("nonfinite")
        if bad and bad["task"] == ctx.task_index and (bad["steps"] == "all" or step in bad["steps"]):
            return outputs.logits.float().mean() * float(bad["value"])
        return None

    def after_optimizer_step(self, ctx) -> None:
        step = self._step(ctx)
        self._maybe_fail("after_optimizer_step", ctx, step)
        if [ctx.task_index, step] in [list(x) for x in self.plan.get("sigterm", [])]:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_task_end(self, ctx) -> None:
        self._maybe_fail("on_task_end", ctx)

    def state_dict(self):
        if getattr(self, "ctx", None) is not None:
            self._maybe_fail("state_dict", self.ctx)
        return {}, {"seen": self.seen}

    def load_state_dict(self, tensors, meta) -> None:
        self.seen = [list(x) for x in meta.get("seen", [])]


# -- comparing runs ---------------------------------------------------------------------------------------------------


def latest(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


def tensors_of(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file of a checkpoint, copied out of the file (load_file may map it, and a test that then
    corrupts the file in place would change the tensors it kept)."""
    return {f.stem: {k: v.clone() for k, v in load_file(str(f)).items()} for f in sorted(ckpt.glob("*.safetensors"))}


def assert_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: different keys {sorted(set(a) ^ set(b))[:5]}"
    diff = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not diff, f"{what}: not bitwise equal: {diff[:5]}"


def computed_state(ckpt: Path) -> dict:
    """The parts of a checkpoint's state.json that the run computed (not its name, paths or timings)."""
    s = json.loads((ckpt / "state.json").read_text())
    cost = s["cost"]
    return {"rows": s["rows"], "strategies": s["strategies"], "task_index": s["task_index"],
            "losses": cost["losses"], "counts": [cost["steps"], cost["samples"], cost["skipped_steps"]]}


def assert_same_run(a: Path, b: Path) -> None:
    """Two finished runs computed the same thing: final checkpoint tensors (weights, strategy state), state, matrix,
    losses; bitwise."""
    ca, cb = latest(a), latest(b)
    assert ca.name == cb.name
    ta, tb = tensors_of(ca), tensors_of(cb)
    assert ta.keys() == tb.keys()
    for group in ta:
        assert_tensors_equal(ta[group], tb[group], f"{group}.safetensors")
    assert computed_state(ca) == computed_state(cb)
    for f in ("matrix.json", "losses.json"):
        assert json.loads((a / f).read_text()) == json.loads((b / f).read_text()), f


def probe_seen(ckpt: Path) -> list:
    return json.loads((ckpt / "state.json").read_text())["strategies"][PROBE]["seen"]


def assert_no_partial_checkpoints(run_dir: Path) -> None:
    """No temporary or half-renamed directory is left, and every checkpoint directory verifies."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    for d in root.iterdir():
        if d.is_dir():
            ck.verify_checkpoint(d)
    if (root / "latest").exists():
        ck.verify_checkpoint(latest(run_dir))


try:  # the child processes have no pytest
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.fixture
    def probe():
        """Register the probe strategy for one test (and the plan it follows), and remove it afterwards."""
        from mmcl.strategies.registry import _REGISTRY, register_strategy

        Probe.plan, Probe.instances = {}, []
        register_strategy(PROBE)(Probe)
        yield Probe
        _REGISTRY.pop(PROBE, None)
        Probe.plan, Probe.instances = {}, []
