"""`mmcl run --accelerate-config FILE` end to end: the CLI checks the file, then hands over to Accelerate's own
launcher (`accelerate launch --config_file FILE -m mmcl run ...`), whose two CPU processes (gloo) train like one
process with the same global batch (docs/distributed.md, tolerance as in docs/reliability.md)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import (
    DDP_ATOL,
    DDP_SHARE,
    FAST,
    QUIET,
    fast_engine,
    latest,
    sigterm_at_first_mid_task_checkpoint,
    tensors_of,
    weight_gap,
)

from mmcl.cli import main
from mmcl.config import load_config
from mmcl.engine import checkpoint as ck
from mmcl.engine import loop

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_file(where: Path) -> Path:
    """The shipped configs/accelerate/ddp.yaml (2 processes), on a port no other test uses."""
    config = yaml.safe_load((ROOT / "configs" / "accelerate" / "ddp.yaml").read_text())
    config["main_process_port"] = free_port()
    path = where / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_accelerate_config_launches_two_processes_that_train_like_one(micro_overrides, monkeypatch, tmp_path):
    acc_file = ddp_file(tmp_path)
    args = micro_overrides("launched", tasks=1, **FAST)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "mmcl", "run", *args, "--accelerate-config", str(acc_file),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ddp, 2 process(es): -m accelerate.commands.launch --config_file" in proc.stderr
    run_dir = tmp_path / "launched"
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["world_size"] == 2, environment  # really two processes, not one

    fast_engine(monkeypatch)
    single = loop.run(load_config(None, micro_overrides("single", tasks=1, **FAST)), **QUIET)
    worst, share = weight_gap(tensors_of(latest(run_dir))["model"], tensors_of(latest(single))["model"])
    assert worst <= DDP_ATOL and share <= DDP_SHARE, f"accelerate launch vs 1 process: {worst:.2e}, {share:.2%} moved"


def rank_pid(launcher: int, rank: int) -> int:
    """The pid of the launched process with LOCAL_RANK=`rank` among `launcher`'s descendants (psutil comes with
    Accelerate)."""
    import psutil

    for child in psutil.Process(launcher).children(recursive=True):
        try:
            if child.environ().get("LOCAL_RANK") == str(rank):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no process with LOCAL_RANK={rank} under {launcher}")


@pytest.mark.slow
@pytest.mark.parametrize("receiver", ["launcher", "rank 1 only"])
def test_sigterm_to_a_launched_run_checkpoints_on_every_rank_and_resumes_to_the_same_weights(receiver, micro_overrides,
                                                                                           monkeypatch, tmp_path):
    """`--accelerate-config` hands the process over to Accelerate's launcher, so a scheduler's SIGTERM reaches the
    launcher, which passes it to both ranks, each at its own moment; a signal may also reach one rank alone. The
    ranks agree on the request, finish the same step, write one complete checkpoint and stop (each rank exits 143,
    the launcher 1); resuming ends with the weights of an uninterrupted run."""
    over = {"data.train_limit": 16, "train.batch_size": 4, "train.epochs": 3, "train.max_steps": 12,
            "data.test_limit": 1, "eval.max_new_tokens": 1, "eval.retention": "false"}
    args = micro_overrides("cut", tasks=1, **over, **{"checkpoint.every_steps": 1})
    run_dir = tmp_path / "cut"
    code, out, err = sigterm_at_first_mid_task_checkpoint(
        [sys.executable, "-m", "mmcl", "run", *args, "--accelerate-config", str(ddp_file(tmp_path)), "--no-progress"],
        run_dir, dict(os.environ, OMP_NUM_THREADS="1"), timeout=180, poll=0.05,
        target=None if receiver == "launcher" else lambda launcher: rank_pid(launcher, 1))
    assert code == 1, err[-3000:]  # the launcher's (torch elastic's SignalException); ranks exit 143
    assert err.count("preempted: task 1/1 color_qa: stopped after step") == 2, err[-3000:]  # both ranks
    stopped = latest(run_dir)
    assert "-step-" in stopped.name
    ck.verify_checkpoint(stopped)

    fast_engine(monkeypatch)  # resume in this process: the checkpoint holds the global state, not a rank's
    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 0
    full = loop.run(load_config(None, micro_overrides("full", tasks=1, **over)), **QUIET)
    worst, share = weight_gap(tensors_of(latest(full))["model"], tensors_of(latest(run_dir))["model"])
    assert worst <= DDP_ATOL and share <= DDP_SHARE, f"stopped at {stopped.name}, resumed: {worst:.2e}, {share:.2%}"


def test_a_command_that_ends_normally_leaves_the_process_group(capsys):
    """Under a launcher the CLI destroys the process group itself once the command is done, so gloo's threads do not
    outlive the interpreter (which aborted a launched rank at exit on a loaded machine); an error leaves it alone
    (another rank may still be in a collective)."""
    import torch.distributed as dist

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert main(["list", "strategies"]) == 0 and not dist.is_initialized()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        assert main(["metrics", "no-such-matrix.json"]) == 2 and dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert "sequential" in capsys.readouterr().out
