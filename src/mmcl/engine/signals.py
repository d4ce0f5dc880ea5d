"""SIGTERM handling for preemptible jobs: a flag the training loop checks after each step."""

from __future__ import annotations

import signal
import threading

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what schedulers (SLURM) expect from a job that stopped on SIGTERM


class StopRequest:
    """Turns SIGTERM into a flag the training loop checks after each step; later signals are ignored, so a second
    SIGTERM cannot interrupt the checkpoint being written. The previous handler is restored on exit."""

    def __init__(self, log=print):
        self.requested = False
        self.log = log
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.log("SIGTERM: finishing the current step, then writing a checkpoint")
        self.requested = True

    def agreed(self, accelerator) -> bool:
        """Whether any rank was asked to stop. SIGTERM reaches each rank at its own moment (or one rank alone), so
        every rank calls this at the same point and all stop there together; one process needs no collective."""
        if accelerator.num_processes == 1:
            return self.requested
        import torch

        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum") > 0)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
