"""Is pre-training's language stage (stage 1) what makes some pre-training seeds weak? Runs `mmcl pretrain` with
stage 0 off and alignment cut to one step, for several seeds and stage-1 learning rates, and records the language
stage's final loss and the language-skill scores; writes docs/results/stage1_seeds.json (with --append, adds its
runs to those already there).

    HF_HUB_OFFLINE=1 .venv/bin/python docs/results/stage1_seeds.py [--seeds 0,1,2,3] [--lrs 3e-3,1e-3] [--epochs 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--lrs", default="3e-3,1e-3")
    ap.add_argument("--epochs", default="8", help="comma-separated stage-1 epoch counts")
    ap.add_argument("--append", action="store_true", help="keep the runs already in --out and add these")
    ap.add_argument("--out", default=str(ROOT / "docs/results/stage1_seeds.json"))
    args = ap.parse_args(argv)
    from mmcl.builtin import builtin_world
    from mmcl.config import TrainConfig
    from mmcl.pretrain import PretrainConfig, pretrain

    world = builtin_world(progress=False)
    out_file = Path(args.out)
    runs = json.loads(out_file.read_text())["runs"] if args.append and out_file.exists() else []
    grid = [(e, float(lr), s) for e in map(int, args.epochs.split(",")) for lr in args.lrs.split(",")
            for s in map(int, args.seeds.split(","))]
    with tempfile.TemporaryDirectory() as tmp:
        for epochs, lr, seed in grid:
            cfg = PretrainConfig(seed=seed, vision_steps=0,
                                 language=TrainConfig(epochs=epochs, batch_size=32, lr=lr, warmup_ratio=0.05),
                                 align=TrainConfig(epochs=1, batch_size=32, lr=1e-3, max_steps=1))
            out = pretrain(world, Path(tmp) / f"s{seed}-{lr}-{epochs}", cfg, progress=False, log=lambda *a: None)
            info = json.loads((out / "pretrain.json").read_text())
            row = {"seed": seed, "lr": lr, "epochs": epochs, "world_data_version": info["world_data_version"],
                   "threads": torch.get_num_threads(), "language_loss": round(info["final_loss"]["language"], 4),
                   "scores": {k: v for k, v in info["scores"].items() if k.startswith("lang_")}}
            runs.append(row)
            print(row, flush=True)
    note = ("stage 0 off, alignment 1 step: only stage 1 is compared; runs without epochs/world_data_version are "
            "8 epochs on world data 3 (threads not recorded)")
    out_file.write_text(json.dumps({"note": note, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
