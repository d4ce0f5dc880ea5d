"""Everything a run needs before its first task: the accelerator, checked records, the model and its processor,
the strategies (a composition that can't run is refused here), and the trainable parts."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from mmcl.config import ConfigError, RunConfig
from mmcl.data.batching import MediaLoader
from mmcl.data.overlap import check_run
from mmcl.data.records import DataError, Problem, Stream, format_problems, read_records
from mmcl.engine.context import Context
from mmcl.engine.distributed import check_accelerator, check_requested, engine_name
from mmcl.engine.hooks import Strategies
from mmcl.models.base import MLLM
from mmcl.seeding import SEED_VALIDATION, hold_out, task_seed
from mmcl.strategies import build_strategies, check_composition, check_task_options


def preflight(stream: Stream, cfg: RunConfig, log=print) -> tuple[dict[str, dict[str, list]], list[Problem]]:
    """Read and check every split the run will touch, before any training. Raises DataError listing every bad
    record (policy `error`), or drops them (policy `skip`) unless too many are bad."""
    records: dict[str, dict[str, list]] = {}
    problems: list[Problem] = []
    validate = cfg.train.early_stopping_patience > 0
    for task in stream.all_tasks:
        records[task.name] = {}
        if not task.splits:  # scored by an external harness (an lm_eval: retention entry): no records of its own
            continue
        splits = ["train", "test"] if task in stream.tasks else ["test"]
        if validate and task in stream.tasks and "val" in task.splits:
            splits.append("val")
        for split in splits:
            limit = cfg.data.train_limit if split == "train" else cfg.data.test_limit
            good, bad = read_records(task, split, allow_outside_root=cfg.data.allow_outside_root, limit=limit)
            problems += bad
            total = len(good) + len(bad)
            if bad and cfg.data.on_bad_record == "skip" and len(bad) > cfg.data.max_bad_fraction * total:
                raise DataError(
                    f"{task.name}/{split}: {len(bad)} of {total} records are bad, more than data.max_bad_fraction="
                    f"{cfg.data.max_bad_fraction}:\n{format_problems(bad)}"
                )
            if not good:
                raise DataError(f"{task.name}/{split}: no usable records in {task.split_path(split)}")
            records[task.name][split] = good
    if validate:
        for index, task in enumerate(stream.tasks):
            if "val" not in records[task.name]:
                if len(records[task.name]["train"]) < 2:
                    raise DataError(f"{task.name}: early stopping holds training records out for validation, but "
                                    "the task has fewer than 2; add a val split or set train.early_stopping_patience=0")
                records[task.name]["train"], records[task.name]["val"] = hold_out(
                    records[task.name]["train"], cfg.train.val_fraction, task_seed(cfg.seed, index, SEED_VALIDATION))
    if problems and cfg.data.on_bad_record == "error":
        raise DataError(
            f"{len(problems)} bad record(s); fix them, or set data.on_bad_record=skip to leave them out:\n"
            + format_problems(problems)
        )
    if problems:
        log(f"skipping {len(problems)} bad record(s) (listed in skipped.jsonl)")
    return records, problems


def make_accelerator(cfg: RunConfig) -> Accelerator:
    from accelerate import DistributedDataParallelKwargs

    from mmcl.engine.tracking import accelerator_kwargs

    # A stream mixing modalities trains every projector it uses, but a batch of one task feeds only its own: DDP must
    # expect parameters without a gradient in a step.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    gpu = torch.cuda.is_available()
    check_requested(gpu)  # FSDP/DeepSpeed asked of a CPU: refused, not silently run as DDP
    _release_single_process_state(cfg.train.precision)
    accelerator = Accelerator(cpu=not gpu, mixed_precision=cfg.train.precision, kwargs_handlers=[ddp],
                              **accelerator_kwargs(cfg))
    check_accelerator(accelerator, cfg)
    return accelerator


def _release_single_process_state(precision: str) -> None:
    """Accelerate keeps one process-wide state and refuses another mixed precision later in the same process; runs
    of one process (a script or notebook running several configs in turn) may change it, so release that state."""
    from accelerate.state import AcceleratorState, PartialState

    if PartialState._shared_state and PartialState().num_processes == 1 and AcceleratorState._shared_state and \
            AcceleratorState().mixed_precision != precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def _feature_cache(model: MLLM, cfg: RunConfig) -> list[str]:
    from mmcl.builtin import mmcl_home
    from mmcl.models.feature_cache import attach_feature_cache

    try:
        return attach_feature_cache(model, cfg.model.feature_cache, mmcl_home() / "features")
    except ValueError as e:
        raise ConfigError(str(e)) from e


def set_trainable(model: MLLM, parts: list[str], modalities: set[str] | None = None) -> None:
    """Train the named parts; encoders and projectors only of the modalities the stream uses (an unused trainable
    tensor would cost optimizer memory and stall DDP's gradient reduction)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for part in parts:
        for p in model.part_parameters(part, modalities):
            p.requires_grad_(True)


def restrict_trainable(model: MLLM, parts: list[str], modalities: set[str] | None = None) -> list:
    """Freeze every trainable parameter outside `parts` (a task's `train:` in its stream entry) and return them, so the
    loop trains them again after the task; what the method trains inside those parts (LoRA's adapters) is kept."""
    keep = {id(p) for part in parts for p in model.part_parameters(part, modalities)}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        for p in frozen:
            p.requires_grad_(True)
        raise ConfigError(f"train: {parts}: nothing the method trains lies in these parts; name parts it trains")
    return frozen


def build_context(
    cfg: RunConfig, accelerator: Accelerator | None = None, *, progress: bool = False, log=print
) -> tuple[Context, Strategies, list[Problem]]:
    """Everything a run needs before its first task: stream, model, checked records, strategies (composition
    refused here if it can't run), trainable parts and the context strategies see. Tests and benchmarks use it too,
    so they exercise exactly what a run does."""
    from mmcl.builtin import mmcl_home, resolve_model, resolve_stream

    accelerator = accelerator or make_accelerator(cfg)
    stream = resolve_stream(cfg.data, progress=progress, log=log)
    model, processor = resolve_model(cfg.model, run_dir=cfg.run_dir, progress=progress, log=log)
    model.to(accelerator.device)
    records, problems = preflight(stream, cfg, log=log)
    strategies = Strategies(build_strategies(cfg.strategies))
    modalities = {t.modality for t in stream.all_tasks if t.modality != "text"}
    unread = sorted(modalities - set(model.modalities))
    if unread:
        raise ConfigError(
            f"the stream has {', '.join(unread)} tasks but the model reads only {sorted(model.modalities)}; use a model "
            "with those encoders (the built-in tiny model reads image, audio and video; "
            "mmcl.models.builder.assemble_model composes one from Hugging Face parts)"
        )
    check_composition(strategies, modalities=modalities, num_processes=accelerator.num_processes,
                      model_capabilities=model.capabilities, backend=model.family, engine=engine_name(accelerator))
    check_task_options(strategies, [t.name for t in stream.tasks])
    no_mid = [s.name for s in strategies if not s.supports_mid_task_resume]
    if cfg.checkpoint.every_steps and no_mid:
        raise ConfigError(f"checkpoint.every_steps: {no_mid} cannot resume inside a task; use 0 (task boundaries)")
    set_trainable(model, cfg.model.train, modalities)
    cached = _feature_cache(model, cfg)
    if cached:
        log(f"feature cache for the frozen {', '.join(cached)} encoder(s) under {mmcl_home() / 'features'}")
    if cfg.train.activation_checkpointing:
        enabled = model.enable_activation_checkpointing()
        if not enabled:
            raise ConfigError("train.activation_checkpointing: no part of this model supports it")
        log(f"activation checkpointing in {', '.join(sorted(set(enabled)))}")
    ctx = Context(cfg, accelerator, model, processor, stream, cfg.run_dir, MediaLoader(processor), records)
    check_run(ctx, strategies, log=log)  # refuses training data that holds an evaluated record
    return ctx, strategies, problems
