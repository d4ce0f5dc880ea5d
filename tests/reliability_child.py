"""`mmcl run` as a child process of the reliability tests, with two test-only additions set from the environment:

  RELIABILITY_AUDIT_DIR   log, per rank, every file this process creates, writes, renames or removes (a Python
                          audit hook), to check that only rank 0 writes a run's shared files
  RELIABILITY_PLAN        a JSON plan for the probe strategy (see support.Probe), applied on the rank
                          named by its "rank" key only, e.g. {"rank": 1, "fail": {"hook": ..., "task": 0, "step": 1}}

Launched as `python -m torch.distributed.run --nproc_per_node=2 tests/reliability_child.py run ...`; everything
after the script name is passed to mmcl's CLI unchanged.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _audit(log_path: Path) -> None:
    rank = os.environ.get("RANK", "0")
    log = open(log_path / f"rank-{rank}.log", "a", buffering=1)  # opened before the hook: not logged itself

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                log.write(f"open {os.fsdecode(args[0])}\n")
        elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.symlink"):
            what = os.fsdecode(args[0]) if args and isinstance(args[0], (str, bytes, os.PathLike)) else args
            log.write(f"{event} {what}\n")

    sys.addaudithook(hook)


def main() -> int:
    from support import PROBE, Probe

    from mmcl.strategies import register_strategy

    register_strategy(PROBE)(Probe)
    plan = json.loads(os.environ.get("RELIABILITY_PLAN", "{}"))
    if plan and int(os.environ.get("RANK", "0")) == plan.get("rank", 0):
        Probe.plan = plan
    if os.environ.get("RELIABILITY_AUDIT_DIR"):
        _audit(Path(os.environ["RELIABILITY_AUDIT_DIR"]))
    from mmcl.cli import main as cli

    return cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
