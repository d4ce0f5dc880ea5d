"""Is pre-training's language stage (stage 1) what makes some pre-training seeds weak? Runs `mmcl pretrain` with
stage 0 off and alignment cut to one step, for several seeds and stage-1 learning rates, and records the language
stage's final loss and the language-skill scores; writes docs/results/stage1_seeds.json.

    HF_HUB_OFFLINE=1 .venv/bin/python docs/results/stage1_seeds.py [--seeds 0,1,2,3] [--lrs 3e-3,1e-3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--lrs", default="3e-3,1e-3")
    ap.add_argument("--out", default=str(ROOT / "docs/results/stage1_seeds.json"))
    args = ap.parse_args(argv)
    from mmcl.builtin import builtin_world
    from mmcl.config import TrainConfig
    from mmcl.pretrain import PretrainConfig, pretrain

    world, runs = builtin_world(progress=False), []
    with tempfile.TemporaryDirectory() as tmp:
        for lr in (float(x) for x in args.lrs.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                cfg = PretrainConfig(seed=seed, vision_steps=0,
                                     language=TrainConfig(epochs=8, batch_size=32, lr=lr, warmup_ratio=0.05),
                                     align=TrainConfig(epochs=1, batch_size=32, lr=1e-3, max_steps=1))
                out = pretrain(world, Path(tmp) / f"s{seed}-{lr}", cfg, progress=False, log=lambda *a: None)
                info = json.loads((out / "pretrain.json").read_text())
                row = {"seed": seed, "lr": lr, "language_loss": round(info["final_loss"]["language"], 4),
                       "scores": {k: v for k, v in info["scores"].items() if k.startswith("lang_")}}
                runs.append(row)
                print(row, flush=True)
    Path(args.out).write_text(json.dumps({"note": "stage 0 off, alignment 1 step: only stage 1 is compared",
                                          "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
