"""Does a wider image tower lift the shape ceiling? Pre-trains the tiny base with its default tower (width 64, 2
layers, stage-0 lr 4e-3) and with a wider one (width 96, 3 layers, lr 3e-3, the stage-0 probe's best in
docs/world.md), each from several pre-training seeds, and fine-tunes the image tasks alone from every instance with
the image stream's recipe (as `ceilings.py` does); writes docs/results/wide_tower.json.

    HF_HUB_OFFLINE=1 .venv/bin/python docs/results/wide_tower.py --work DIR [--pretrain-seeds 0,1] [--seeds 0,1]

Base models go to DIR/{base,wide}-s{seed} (one already there is reused; its pretrain.json says how long it took);
the world is the built-in one under $MMCL_HOME. Instances are merged into the JSON file, so pre-training seeds can
be measured in separate calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceilings import ceiling, stream_tasks  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOWERS = {"base": {}, "wide": {"vision_hidden": 96, "vision_layers": 3, "vision_lr": 3e-3}}


def base_model(world: Path, out: Path, kind: str, seed: int) -> Path:
    """The pre-trained instance `kind` / `seed` at `out`, made unless it is there."""
    from mmcl.models.tiny import TinySizes
    from mmcl.pretrain import PretrainConfig, pretrain

    if not (out / "mmcl_model.json").exists():
        spec = dict(TOWERS[kind])
        lr = spec.pop("vision_lr", PretrainConfig.vision_lr)
        pretrain(world, out, PretrainConfig(seed=seed, sizes=TinySizes(**spec), vision_lr=lr), progress=False)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="where the base models are kept")
    ap.add_argument("--pretrain-seeds", default="0,1")
    ap.add_argument("--seeds", default="0,1", help="fine-tuning seeds per instance")
    ap.add_argument("--tasks", default="shape_cls,count,grounding,ocr,color_qa")
    ap.add_argument("--out", default=str(ROOT / "docs/results/wide_tower.json"))
    args = ap.parse_args(argv)
    from mmcl.builtin import builtin_world

    world = builtin_world(progress=False)
    tasks = stream_tasks(world)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    doc: dict = json.loads(out.read_text()) if out.exists() else {"towers": TOWERS, "seeds": seeds, "instances": {}}
    if doc["seeds"] != seeds:
        print(f"error: {out} holds fine-tuning seeds {doc['seeds']}; choose another --out", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        for kind in TOWERS:
            for p in (int(s) for s in args.pretrain_seeds.split(",")):
                base = base_model(world, Path(args.work) / f"{kind}-s{p}", kind, p)
                info = json.loads((base / "pretrain.json").read_text())
                scores, work = {}, Path(tmp) / f"{kind}-s{p}"
                work.mkdir()
                for task in args.tasks.split(","):
                    stream, task_dir = tasks[task]
                    scores[task] = [ceiling(task, stream, task_dir, s, work, [f"model.path={base}"])["score"]
                                    for s in seeds]
                doc["instances"][f"{kind}-s{p}"] = {"pretrain_time_s": info.get("time_s"),
                                                    "base_scores": info.get("scores"), "ceilings": scores}
                print(f"{kind}-s{p}: " + ", ".join(f"{t} {v}" for t, v in scores.items()), flush=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
