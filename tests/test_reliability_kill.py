"""Real SIGKILLs (docs/reliability.md, "Killed at any moment"): the `mmcl run` CLI in a child process is stopped by
SIGKILL at a chosen moment (training inside a task, half-way through writing a checkpoint, evaluation, right after a
checkpoint), then `mmcl run --resume` finishes it, and the run is bitwise the run that was never killed: weights,
strategy state, losses, accuracy matrix.

The moment is made deterministic by the child itself: it wraps one engine function so that, at that point, it writes
a marker file and sleeps; the test waits for the marker and then kills the process (SIGKILL cannot be caught, so
nothing of the run's own clean-up runs). Each case starts one child (~5-10 s: it imports torch and transformers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support import QUIET, assert_no_partial_checkpoints, assert_same_run, fast_engine, stream_file

from mmcl.cli import main
from mmcl.config import load_config
from mmcl.engine import loop

pytestmark = pytest.mark.integration

# The child: `python -c CHILD run ARGS...`. KILL_POINT names where it stops and waits for the kill.
CHILD = r"""
import os, sys, time
from pathlib import Path

point, marker = os.environ["KILL_POINT"], Path(os.environ["KILL_MARKER"])


def wait_for_the_kill():
    marker.write_text(point)
    time.sleep(600)


from mmcl.engine import checkpoint as ck, loop

if point == "training":  # task 2, just after its 2nd optimizer step, before that step's checkpoint
    real_fit = loop.fit

    def fit(*args, **kw):
        on_step = kw["on_step"]

        def step(s, loss):
            on_step(s, loss)
            if kw["label"].startswith("task 2/") and s == 1:
                wait_for_the_kill()

        return real_fit(*args, **dict(kw, on_step=step))

    loop.fit = fit
elif point == "saving":  # task 1's boundary checkpoint: model.safetensors written into .tmp-*, nothing renamed
    real_save = ck.save_file

    def save_file(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        if f".tmp-task-01-color_qa-{os.getpid()}" in path:
            wait_for_the_kill()

    ck.save_file = save_file
elif point == "evaluating":  # row 2 evaluated and its predictions written; no matrix row, no checkpoint yet
    real_eval = loop.evaluate_row

    def evaluate_row(ctx, row, progress):
        scores = real_eval(ctx, row, progress)
        if row == 2:
            wait_for_the_kill()
        return scores

    loop.evaluate_row = evaluate_row
elif point == "checkpointed":  # task 1's boundary checkpoint complete, its mid-task ones not yet removed
    real_ckpt = ck.save_checkpoint

    def save_checkpoint(root, name, *args, **kw):
        out = real_ckpt(root, name, *args, **kw)
        if name == "task-01-color_qa":
            wait_for_the_kill()
        return out

    ck.save_checkpoint = save_checkpoint

from mmcl.cli import main

sys.exit(main(sys.argv[1:]))
"""

# kill point -> the checkpoint the resume starts from
POINTS = {
    "training": "task-02-shape_cls-step-000001",
    "saving": "task-01-color_qa-step-000002",
    "evaluating": "task-02-shape_cls-step-000002",
    "checkpointed": "task-01-color_qa",
}
CASES = [
    pytest.param("training", "lora"),
    pytest.param("saving", "ewc"),
    pytest.param("evaluating", "lora"),
    pytest.param("checkpointed", "ewc"),
    pytest.param("training", "ewc"),  # EWC/MAS rebuild their anchor after a resume restored Ω inside a task
]


def run_args(world: Path, model: Path, where: Path, name: str, strategy: str) -> list[str]:
    """Two tasks of 3 steps each (batches of 4 of 8 records, 2 epochs), a mid-task checkpoint after every step, one
    strategy with state (EWC: importance and anchors at every boundary; LoRA: the adapter and its optimizer state),
    1 test record per task."""
    return [f"name={name}", f"output_dir={where / name}", f"model.path={model}",
            f"data.stream={stream_file(world, ['color_qa', 'shape_cls'], where)}", f"strategies=[{strategy}]",
            "data.train_limit=8", "data.test_limit=1", "train.batch_size=4", "train.epochs=2", "train.max_steps=3",
            "train.lr=1e-3", "train.warmup_ratio=0.03", "eval.max_new_tokens=2", "eval.retention=false",
            "checkpoint.every_steps=1"]


@pytest.fixture(scope="module")
def uninterrupted(micro_world, micro_model, tmp_path_factory):
    """strategy -> the run directory of its uninterrupted run (each computed once per module)."""
    done: dict[str, Path] = {}

    def get(strategy: str) -> Path:
        if strategy not in done:
            where = tmp_path_factory.mktemp(f"kill-reference-{strategy}")
            with pytest.MonkeyPatch.context() as mp:
                fast_engine(mp)
                torch.set_num_threads(1)
                cfg = load_config(None, run_args(micro_world, micro_model, where, "whole", strategy))
                done[strategy] = loop.run(cfg, **QUIET)
        return done[strategy]

    return get


@pytest.mark.parametrize("point, strategy", CASES)
def test_sigkill_then_resume_gives_the_uninterrupted_run(point, strategy, uninterrupted, micro_world, micro_model, tmp_path,
                                                         monkeypatch, capsys):
    torch.set_num_threads(1)
    args = run_args(micro_world, micro_model, tmp_path, "killed", strategy)
    run_dir, marker = tmp_path / "killed", tmp_path / "reached"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", KILL_POINT=point, KILL_MARKER=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "run", *args, "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, f"the child ended before reaching {point}: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, f"the child never reached {point}"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    stale = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-"))
    assert bool(stale) == (point == "saving"), stale  # the kill really landed inside the save (and only there)

    fast_engine(monkeypatch)
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"from checkpoint {POINTS[point]}\n" in out, out
    if stale:
        assert f"removed 1 incomplete checkpoint save(s) left by an interrupted run: {stale[0]}" in out
    assert_no_partial_checkpoints(run_dir)
    assert_same_run(uninterrupted(strategy), run_dir)
