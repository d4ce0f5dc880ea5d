"""What a run ran on, written to `environment.json` in its directory: package versions, device, processes and the
effective batch, so a number can be reproduced (the peers' users cannot: none of this is recorded there)."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

import torch
from accelerate import Accelerator

from mmcl.config import RunConfig

PACKAGES = ("mmcl", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "numpy", "pillow")


def environment(cfg: RunConfig, accelerator: Accelerator) -> dict:
    """The environment of a run as JSON-able data."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    device = accelerator.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    world = accelerator.num_processes
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "packages": versions,
        "device": str(device),
        "gpu": gpu,
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "world_size": world,
        "mixed_precision": accelerator.mixed_precision,
        "global_batch_size": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "micro_batch_per_process": max(1, cfg.train.batch_size // (cfg.train.grad_accum * world)),
    }
