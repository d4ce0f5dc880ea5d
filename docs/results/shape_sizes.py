"""Shape classification errors by the drawn shape's width: fine-tune shape_cls alone (as ceilings.py does) from each
base, then count the wrong answers among the test images in 4-pixel width bins. Merges one --label into --out.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python docs/results/shape_sizes.py --label data4 \
        --world WORLD --models BASE0,BASE1 --seeds 0,1

Why: with shapes drawn 50-80 % of the 64-px image wide (world data 4) the single-task ceiling stayed under its
target of 95; this shows where the errors fall (docs/world.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceilings import ROOT, ceiling, stream_tasks  # noqa: E402

from mmcl.data.synth.shapes import BACKGROUNDS  # noqa: E402


def shape_width(path: Path) -> int:
    """Width in pixels of the drawn shape (the larger side of the box around its non-background pixels)."""
    pix = np.asarray(Image.open(path).convert("RGB"))
    ys, xs = np.nonzero(~(pix[:, :, None, :] == np.array(BACKGROUNDS)[None, None]).all(-1).any(-1))
    return int(max(xs.max() - xs.min(), ys.max() - ys.min()) + 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", required=True, help="name of this measurement in --out, e.g. data4")
    ap.add_argument("--world", required=True, help="a world directory")
    ap.add_argument("--models", required=True, help="comma-separated base model directories")
    ap.add_argument("--seeds", default="0,1", help="comma-separated fine-tuning seeds (default 0,1)")
    ap.add_argument("--out", default=str(ROOT / "docs/results/shape_sizes.json"))
    args = ap.parse_args(argv)
    world = Path(args.world)
    stream, task_dir = stream_tasks(world)["shape_cls"]
    records = [json.loads(line) for line in (task_dir / "test.jsonl").read_text().splitlines()]
    widths = {r["id"]: shape_width(task_dir / r["image"]) for r in records}
    bins: dict[int, list[int]] = {}
    confusions: Counter = Counter()
    scores: dict[str, list[float]] = {}
    for model in args.models.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                r = ceiling("shape_cls", stream, task_dir, seed, Path(tmp), [f"model.path={model}"])
                rows = sorted((Path(tmp) / f"shape_cls-{seed}" / "predictions").iterdir())
                preds = [json.loads(line) for line in (rows[-1] / "shape_cls.jsonl").read_text().splitlines()]
            scores.setdefault(model, []).append(r["score"])
            for p in preds:
                b = bins.setdefault(widths[p["id"]] // 4 * 4, [0, 0])
                b[0] += 1
                if p["score"] < 100:
                    b[1] += 1
                    confusions[f"{p['references'][0]} -> {p['prediction']}"] += 1
    table = {f"{b}-{b + 3} px": {"records": n, "wrong": w, "error_pct": round(100 * w / n, 1)}
             for b, (n, w) in sorted(bins.items())}
    for k, v in table.items():
        print(f"{k:10s} {v['wrong']:3d}/{v['records']:3d}  {v['error_pct']:5.1f} %")
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    doc[args.label] = {"world": str(world), "world_data_version": json.loads((world / "world.json").read_text())
                       .get("data_version"), "models": scores, "by_width": table,
                       "confusions": dict(confusions.most_common()),
                       "command": "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python docs/results/shape_sizes.py "
                                  f"--label {args.label} --world WORLD --models BASES --seeds {args.seeds}"}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
