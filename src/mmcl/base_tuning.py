"""Training a saved base model further before any stream starts, and saving a base model safely.

Two recipes train a base that already exists: LLaVA stage 1 on a model with real pretrained parts (only the
projectors learn, `mmcl pretrain --model small`, `mmcl.stage1`) and P3's multi-task instruction-tuned base
(projectors and language model, `mmcl pretrain --instruct`, `mmcl.pretrain.instruction_tune`). Both are
`tune_base`: load, train the named parts on some tasks' train splits, score tasks' test splits, save with the
scores, and save it with `save_base` (through `mmcl.models.builder.write_dir`, so an interruption never leaves a
half-written model where a run would load it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator

from mmcl.config import TrainConfig
from mmcl.data.batching import Collator, MediaLoader, encode_records
from mmcl.data.records import DataError, Record, Task, format_problems, read_records
from mmcl.engine.train import fit
from mmcl.eval.generate import evaluate_task
from mmcl.models.builder import load_model, save_model, write_dir
from mmcl.models.composition import composition_processor
from mmcl.models.feature_cache import attach_feature_cache

__all__ = ["clean_records", "save_base", "tune_base"]


def save_base(model, tokenizer, out: Path, info: dict) -> None:
    """An mmcl model directory with `info` in pretrain.json (and in its index), written with `write_dir`."""

    def build(tmp: Path) -> None:
        save_model(model.cpu(), tokenizer, tmp, extra={"pretrain": info})
        (tmp / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")

    write_dir(Path(out), build)


def clean_records(task: Task, split: str, what: str, limit: int | None = None) -> list[Record]:
    """A split's records; a bad record stops the recipe (`what` names the data in the message), none is skipped."""
    good, bad = read_records(task, split, limit=limit)
    if bad:
        raise DataError(f"{task.manifest}: bad records in the {what}:\n{format_problems(bad)}")
    return good


def tune_base(base: Path, train: Sequence[Task], scored: Sequence[Task], out: Path, cfg: TrainConfig, *,
              parts: Sequence[str], info: dict, what: str, label: str, seed: int = 0, score_before: bool = False,
              train_limit: int | None = None, test_limit: int | None = None, eval_batch_size: int = 32,
              cache_root: Path | None = None, leave_out: Collection[str] = (), progress: bool = True,
              log=print) -> dict:
    """Train only `parts` of the mmcl model at `base` on the train splits of `train` (less the records whose
    `source`, file:line, is in `leave_out`), score the test splits of `scored` (also before training with
    `score_before`), and save it to `out` with `info`, the config, steps, final loss, time and scores in
    pretrain.json (the dict returned). A task in a modality the model has no encoder for is refused before any
    training."""
    t0 = time.perf_counter()
    model, tokenizer = load_model(base)
    processor = composition_processor(model, tokenizer)
    media = MediaLoader(processor)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    missing = sorted({t.modality for t in [*train, *scored] if t.modality != "text"} - set(model.modalities))
    if missing:
        raise DataError(f"the {what} reads {missing} but the model at {base} has no such encoder")
    model.to(accelerator.device)
    for p in model.parameters():
        p.requires_grad_(False)
    for part in parts:
        for p in model.part_parameters(part):
            p.requires_grad_(True)
    if cache_root is not None:
        attach_feature_cache(model, "auto", cache_root)
    leave_out = set(leave_out)
    examples = [e for t in train for e in encode_records(
        [r for r in clean_records(t, "train", what, train_limit) if r.source not in leave_out], processor, t.name)]
    left = Collator(processor, media, left_pad=True)

    def scores() -> dict[str, float]:
        model.eval()
        return {t.name: round(evaluate_task(model, processor, left, t, clean_records(t, "test", what, test_limit),
                                            batch_size=eval_batch_size, device=accelerator.device).score, 2)
                for t in scored}

    before = scores() if score_before else None
    log(f"{label}: {', '.join(parts)} on {len(examples)} records ({', '.join(t.name for t in train)})")
    result = fit(model, examples, Collator(processor, media), cfg, accelerator, seed=seed, label=label,
                 progress=progress)
    info = {"base": str(Path(base).resolve()), **info, "config": asdict(cfg), "steps": result.steps,
            "final_loss": result.losses[-1] if result.losses else None,
            **({"scores_before": before} if before is not None else {}), "scores": scores(),
            "time_s": round(time.perf_counter() - t0, 1)}
    save_base(model, tokenizer, Path(out), info)
    return info
