"""Distributed runs, through Accelerate only: which engine a run is under (one process, DDP, FSDP, a DeepSpeed ZeRO
stage), the Accelerate config files `mmcl run --accelerate-config FILE` takes (read and checked against the run config
before any process starts), and the `accelerate launch` command that starts the processes.

Accelerate 1.15 enables FSDP and DeepSpeed only on GPU-type devices: on a CPU, `Accelerator(cpu=True)` sets up plain
DDP (gloo) even when `accelerate launch` asked for FSDP, and never starts DeepSpeed. Those engines are therefore
refused on a machine without a GPU, before launch and again inside each process (`accelerate launch -m mmcl run`).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mmcl.config import ConfigError, RunConfig
from mmcl.strategies.registry import engine_refusal
from mmcl.yaml_files import read_yaml_mapping

DISTRIBUTED_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP", "DEEPSPEED")
"""The `distributed_type` values of an Accelerate config that mmcl takes."""
_NEEDS_GPU = {
    "FSDP": "Accelerate 1.15 enables FSDP only on GPUs: on a CPU it silently sets up DDP instead",
    "DEEPSPEED": "Accelerate 1.15 enables DeepSpeed only on GPUs (with use_cpu it never starts DeepSpeed; without, "
                 "DeepSpeed runs on its CPU accelerator but Accelerate reports 1 process on every rank)",
}


@dataclass
class LaunchConfig:
    """The parts of an Accelerate config file (`accelerate config` format) that mmcl checks before launching."""

    path: Path
    distributed_type: str
    num_processes: int
    mixed_precision: str | None
    deepspeed: dict = field(default_factory=dict)
    """DeepSpeed's own config: the JSON file `deepspeed_config_file` names, or the inline keys translated to it."""

    @property
    def engine(self) -> str:
        if self.distributed_type == "FSDP":
            return "fsdp"
        if self.distributed_type == "DEEPSPEED":
            return f"deepspeed-zero{deepspeed_stage(self.deepspeed)}"
        return "ddp" if self.num_processes > 1 and self.distributed_type != "NO" else "single"


def deepspeed_stage(ds: dict) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def read_launch_config(path: Path | str) -> LaunchConfig:
    """Read an Accelerate config file; a missing file or a bad field is one `ConfigError` naming file and field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--accelerate-config {path}: no such file (examples: configs/accelerate/*.yaml)")
    raw = read_yaml_mapping(path, ConfigError, "a mapping as `accelerate config` writes it")
    kind = raw.get("distributed_type", "NO")
    if kind not in DISTRIBUTED_TYPES:
        raise ConfigError(f"{path}: distributed_type={kind!r} is not one mmcl runs; use one of "
                          f"{', '.join(DISTRIBUTED_TYPES)}")
    n = raw.get("num_processes", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"{path}: num_processes={n!r}; expected a whole number ≥ 1")
    precision = raw.get("mixed_precision")
    ds: dict = {}
    if kind == "DEEPSPEED":
        inline = raw.get("deepspeed_config") or {}
        if not isinstance(inline, dict):
            raise ConfigError(f"{path}: deepspeed_config must be a mapping, got {inline!r}")
        if inline.get("deepspeed_config_file"):
            ds_path = Path(inline["deepspeed_config_file"])
            try:
                ds = json.loads(ds_path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"{path}: deepspeed_config_file {ds_path}: cannot read it as JSON: {e}") from e
        else:
            ds = {"zero_optimization": {"stage": int(inline.get("zero_stage", 2))}}
            for key in ("gradient_accumulation_steps", "gradient_clipping"):
                if key in inline:
                    ds[key] = inline[key]
    return LaunchConfig(path, kind, n, None if precision is None else str(precision), ds)


def check_deepspeed(ds: dict, cfg: RunConfig, world: int, where: str) -> None:
    """Refuse a DeepSpeed config whose batch sizes, clipping or precision disagree with the run's ("auto" agrees with
    any value)."""
    train = cfg.train
    gas = ds.get("gradient_accumulation_steps", "auto")
    micro = ds.get("train_micro_batch_size_per_gpu", "auto")
    total = ds.get("train_batch_size", "auto")
    if isinstance(gas, int) and gas != train.grad_accum:
        raise ConfigError(f"{where}: DeepSpeed gradient_accumulation_steps={gas} but train.grad_accum="
                          f"{train.grad_accum}; set both to the same value (or \"auto\" in the DeepSpeed config)")
    if isinstance(micro, int):
        product = micro * train.grad_accum * world
        if product != train.batch_size:
            raise ConfigError(
                f"{where}: DeepSpeed train_micro_batch_size_per_gpu × gradient accumulation × processes = {micro} × "
                f"{train.grad_accum} × {world} = {product}, but train.batch_size={train.batch_size}; set "
                f"train_micro_batch_size_per_gpu to train.batch_size / (train.grad_accum × processes), or \"auto\"")
    if isinstance(total, int) and total != train.batch_size:
        raise ConfigError(f"{where}: DeepSpeed train_batch_size={total} but train.batch_size={train.batch_size}; "
                          "set both to the same value (or \"auto\")")
    clip = ds.get("gradient_clipping", "auto")
    if isinstance(clip, (int, float)) and float(clip) != float(train.max_grad_norm):
        raise ConfigError(f"{where}: DeepSpeed gradient_clipping={clip} but train.max_grad_norm={train.max_grad_norm}; "
                          "set both to the same value (or \"auto\")")
    flags = {k: (ds.get(k) or {}).get("enabled", False) for k in ("bf16", "fp16")}
    if "auto" not in flags.values():
        ds_precision = "bf16" if flags["bf16"] is True else "fp16" if flags["fp16"] is True else "no"
        if ds_precision != train.precision:
            raise ConfigError(f"{where}: DeepSpeed precision is {ds_precision} (bf16.enabled={flags['bf16']}, "
                              f"fp16.enabled={flags['fp16']}) but train.precision={train.precision}; make them agree")


def check_launch(launch: LaunchConfig, cfg: RunConfig, *, gpu: bool) -> None:
    """Everything that can be refused before a process starts: an engine this machine cannot run, a precision or
    DeepSpeed batch size that disagrees with the run config, a strategy that cannot run under the engine."""
    where = str(launch.path)
    if launch.distributed_type in _NEEDS_GPU and not gpu:
        raise ConfigError(f"{where}: distributed_type {launch.distributed_type} needs GPUs and this machine has none: "
                          f"{_NEEDS_GPU[launch.distributed_type]}. Use configs/accelerate/ddp.yaml")
    if launch.mixed_precision is not None and launch.mixed_precision != cfg.train.precision:
        raise ConfigError(f"{where}: mixed_precision={launch.mixed_precision!r} but train.precision="
                          f"{cfg.train.precision!r}; mmcl takes the precision from train.precision, so set the same "
                          "value in both (or remove mixed_precision from the file)")
    if launch.distributed_type == "DEEPSPEED":
        check_deepspeed(launch.deepspeed, cfg, launch.num_processes, where)
    _check_strategies(cfg, launch.engine)


def _check_strategies(cfg: RunConfig, engine: str) -> None:
    from mmcl.strategies import build_strategies

    for strategy in build_strategies(cfg.strategies):
        refused = engine_refusal(strategy, engine)
        if refused:
            raise ConfigError(refused)


def launch_command(config_file: Path | str, run_args: list[str]) -> list[str]:
    """`accelerate launch --config_file FILE -m mmcl run ARGS`, with this Python (Accelerate's own launcher)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file), "-m", "mmcl", "run",
            *run_args]


def under_launcher() -> bool:
    """Whether this process was started by a launcher (accelerate launch, torchrun)."""
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def requested_engine() -> str | None:
    """The sharded engine `accelerate launch` asked this process for (from its environment), if any."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "DEEPSPEED"
    return None


def check_requested(gpu: bool) -> None:
    """Inside a launched process, before the Accelerator is built: refuse FSDP/DeepSpeed without a GPU (Accelerate
    would fall back to DDP or fail on a missing package instead of saying so)."""
    kind = requested_engine()
    if kind and not gpu:
        raise ConfigError(f"accelerate launch asked for {kind}, which needs GPUs and this machine has none: "
                          f"{_NEEDS_GPU[kind]}. Launch with configs/accelerate/ddp.yaml")


def engine_name(accelerator) -> str:
    """The engine an Accelerator runs: single, ddp, fsdp or deepspeed-zeroN (see `registry.ENGINES`)."""
    from accelerate import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return f"deepspeed-zero{deepspeed_stage(accelerator.state.deepspeed_plugin.deepspeed_config)}"
    return "single" if accelerator.num_processes == 1 else "ddp"


def check_accelerator(accelerator, cfg: RunConfig) -> None:
    """After the Accelerator is built: it runs the engine that was asked for, and a DeepSpeed config agrees with the
    run's batch sizes and precision."""
    engine = engine_name(accelerator)
    kind = requested_engine()
    if kind and not engine.startswith("fsdp" if kind == "FSDP" else "deepspeed"):
        raise ConfigError(f"accelerate launch asked for {kind} but Accelerate set up {engine}; refusing to train "
                          "under another engine than the one asked for")
    if engine.startswith("deepspeed"):
        check_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, cfg, accelerator.num_processes,
                        "the DeepSpeed config of this launch")
