"""LLaVA stage 1 for a model with real pretrained parts: projector alignment on the world's captions.

The encoders and the language model keep their pretrained weights (frozen); only the new projectors learn to map
features into the language model's embedding space, from caption records (image, audio and video alignment tasks of
the built-in world, or any task directories given). Hyper-parameters follow P1's stage 1 (LLaVA-1.5): lr 1e-3,
no weight decay, 3 % warm-up then cosine, one epoch. `mmcl pretrain --model small` runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmcl.base_tuning import tune_base
from mmcl.config import TrainConfig
from mmcl.data.records import load_task

STAGE1 = TrainConfig(epochs=1, batch_size=32, lr=1e-3, weight_decay=0.0, warmup_ratio=0.03, schedule="cosine")


def align_projectors(base: Path, tasks: list[Path], out: Path, cfg: TrainConfig = STAGE1, *, seed: int = 0,
                     train_limit: int | None = None, test_limit: int | None = 64, cache_root: Path | None = None,
                     progress: bool = True, log=print) -> Path:
    """Train only the projectors of the mmcl model at `base` on the caption tasks `tasks`; save to `out` with each
    task's test score before and after (so the alignment is seen to work)."""
    loaded = [load_task(t) for t in tasks]
    info = tune_base(base, loaded, loaded, out, cfg, parts=["projectors"], what="alignment data", label="stage 1",
                     info={"stage": "align (projectors only)", "tasks": [str(t) for t in tasks]}, seed=seed,
                     score_before=True, train_limit=train_limit, test_limit=test_limit, cache_root=cache_root,
                     progress=progress, log=log)
    before = info["scores_before"]
    log("stage 1 caption scores: " + ", ".join(f"{k} {before[k]:.1f} -> {v:.1f}" for k, v in info["scores"].items()))
    return Path(out)


def world_alignment_tasks(world: Path, modalities: tuple[str, ...]) -> list[Path]:
    """The built-in world's alignment (caption) tasks for the modalities a model reads."""
    index = json.loads((Path(world) / "world.json").read_text())
    tasks = [Path(world) / p for p in index["pretrain"]["align"]]
    return [t for t in tasks if load_task(t).modality in modalities]
