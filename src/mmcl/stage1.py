"""LLaVA stage 1 for a model with real pretrained parts: projector alignment on the world's captions.

The encoders and the language model keep their pretrained weights (frozen); only the new projectors learn to map
features into the language model's embedding space, from caption records (image, audio and video alignment tasks of
the built-in world, or any task directories given). Hyper-parameters follow P1's stage 1 (LLaVA-1.5): lr 1e-3,
no weight decay, 3 % warm-up then cosine, one epoch. `mmcl pretrain --model small` runs it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator

from mmcl.config import TrainConfig
from mmcl.data.batching import Collator, MediaLoader, encode_records
from mmcl.data.records import DataError, format_problems, load_task, read_records
from mmcl.engine.train import fit
from mmcl.eval.generate import evaluate_task
from mmcl.models.builder import load_model
from mmcl.models.composition import composition_processor
from mmcl.models.feature_cache import attach_feature_cache

STAGE1 = TrainConfig(epochs=1, batch_size=32, lr=1e-3, weight_decay=0.0, warmup_ratio=0.03, schedule="cosine")


def _records(task, split: str, limit: int | None):
    good, bad = read_records(task, split, limit=limit)
    if bad:
        raise DataError(f"{task.manifest}: bad records in the alignment data:\n{format_problems(bad)}")
    return good


def align_projectors(base: Path, tasks: list[Path], out: Path, cfg: TrainConfig = STAGE1, *, seed: int = 0,
                     train_limit: int | None = None, test_limit: int | None = 64, cache_root: Path | None = None,
                     progress: bool = True, log=print) -> Path:
    """Train only the projectors of the mmcl model at `base` on the caption tasks `tasks`; save to `out` with each
    task's test score before and after (so the alignment is seen to work)."""
    from mmcl.pretrain import save_base

    t0 = time.perf_counter()
    model, tokenizer = load_model(base)
    processor = composition_processor(model, tokenizer)
    media = MediaLoader(processor)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model.to(accelerator.device)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.part_parameters("projectors"):
        p.requires_grad_(True)
    if cache_root is not None:
        attach_feature_cache(model, "auto", cache_root)
    loaded = [load_task(t) for t in tasks]
    missing = sorted({m for t in loaded for m in [t.modality] if m != "text" and m not in model.modalities})
    if missing:
        raise DataError(f"alignment tasks read {missing} but the model at {base} has no such encoder")
    examples = [e for t in loaded for e in encode_records(_records(t, "train", train_limit), processor, t.name)]
    left = Collator(processor, media, left_pad=True)

    def scores() -> dict[str, float]:
        model.eval()
        return {t.name: round(evaluate_task(model, processor, left, t, _records(t, "test", test_limit),
                                            batch_size=32, device=accelerator.device).score, 2) for t in loaded}

    before = scores()
    log(f"stage 1: projectors on {len(examples)} captions ({', '.join(t.name for t in loaded)})")
    result = fit(model, examples, Collator(processor, media), cfg, accelerator, seed=seed, label="stage 1",
                 progress=progress)
    after = scores()
    info = {"base": str(Path(base).resolve()), "stage": "align (projectors only)", "tasks": [str(t) for t in tasks],
            "config": asdict(cfg), "steps": result.steps, "final_loss": result.losses[-1] if result.losses else None,
            "scores_before": before, "scores": after, "time_s": round(time.perf_counter() - t0, 1)}
    save_base(model, tokenizer, Path(out), info)
    log("stage 1 caption scores: " + ", ".join(f"{k} {before[k]:.1f} -> {v:.1f}" for k, v in after.items()))
    return Path(out)


def world_alignment_tasks(world: Path, modalities: tuple[str, ...]) -> list[Path]:
    """The built-in world's alignment (caption) tasks for the modalities a model reads."""
    index = json.loads((Path(world) / "world.json").read_text())
    tasks = [Path(world) / p for p in index["pretrain"]["align"]]
    return [t for t in tasks if load_task(t).modality in modalities]
