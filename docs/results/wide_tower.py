"""Does another image tower lift the shape and count ceilings? Pre-trains the tiny base with its default tower
(`TinySizes`: width 64, 3 layers since base recipe 3; stage-0 lr 4e-3, 6000 steps) and with variants (`TOWERS`:
e.g. width 96 and 3 layers at lr 3e-3, the stage-0 probe's best in docs/world.md; 2 layers; more stage-0 steps),
each from several pre-training seeds, and fine-tunes the image tasks alone from every instance with the image
stream's recipe (as `ceilings.py` does); writes docs/results/tower_variants_v4.json or --out (wide_tower.json holds
the same study on world data 3, made at commit 8ec824d).

    HF_HUB_OFFLINE=1 .venv/bin/python docs/results/wide_tower.py --work DIR [--towers base,wide] \
        [--pretrain-seeds 0,1] [--seeds 0,1] [--out FILE]

Base models go to DIR/{tower}-s{seed} (one already there is reused; its pretrain.json says how long it took);
the world is the built-in one under $MMCL_HOME. Instances are merged into the JSON file, so pre-training seeds can
be measured in separate calls, side by side.
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
TOWERS = {"base": {}, "wide": {"vision_hidden": 96, "vision_layers": 3, "vision_lr": 3e-3},
          "two_layers": {"vision_layers": 2}, "two_layers_steps9k": {"vision_layers": 2, "vision_steps": 9000},
          "steps12k": {"vision_steps": 12000}}
"""Tower variants: TinySizes fields, plus PretrainConfig's vision_lr / vision_steps. "base" is the current default
(3 layers since base recipe 3; 2 in wide_tower.json, world data 3)."""


def base_model(world: Path, out: Path, kind: str, seed: int) -> Path:
    """The pre-trained instance `kind` / `seed` at `out`, made unless it is there."""
    from mmcl.models.tiny import TinySizes
    from mmcl.pretrain import PretrainConfig, pretrain

    if not (out / "mmcl_model.json").exists():
        spec = dict(TOWERS[kind])
        stage0 = {k: spec.pop(k) for k in ("vision_lr", "vision_steps") if k in spec}
        pretrain(world, out, PretrainConfig(seed=seed, sizes=TinySizes(**spec), **stage0), progress=False)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="where the base models are kept")
    ap.add_argument("--towers", default="base,wide", help=f"comma list of {', '.join(TOWERS)}")
    ap.add_argument("--pretrain-seeds", default="0,1")
    ap.add_argument("--seeds", default="0,1", help="fine-tuning seeds per instance")
    ap.add_argument("--tasks", default="shape_cls,count,grounding,ocr,color_qa")
    ap.add_argument("--out", default=str(ROOT / "docs/results/tower_variants_v4.json"))
    args = ap.parse_args(argv)
    from mmcl.builtin import builtin_world

    world = builtin_world(progress=False)
    tasks = stream_tasks(world)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    towers = args.towers.split(",")
    unknown = [t for t in towers if t not in TOWERS]
    if unknown:
        print(f"error: unknown tower(s) {', '.join(unknown)}; known: {', '.join(TOWERS)}", file=sys.stderr)
        return 2
    doc: dict = json.loads(out.read_text()) if out.exists() else {"towers": {}, "seeds": seeds, "instances": {}}
    doc["towers"].update({t: TOWERS[t] for t in towers})
    if doc["seeds"] != seeds:
        print(f"error: {out} holds fine-tuning seeds {doc['seeds']}; choose another --out", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        for kind in towers:
            for p in (int(s) for s in args.pretrain_seeds.split(",")):
                base = base_model(world, Path(args.work) / f"{kind}-s{p}", kind, p)
                info = json.loads((base / "pretrain.json").read_text())
                scores, work = {}, Path(tmp) / f"{kind}-s{p}"
                work.mkdir()
                for task in args.tasks.split(","):
                    stream, task_dir = tasks[task]
                    scores[task] = [ceiling(task, stream, task_dir, s, work, [f"model.path={base}"])["score"]
                                    for s in seeds]
                doc["instances"][f"{kind}-s{p}"] = {"world_data_version": info.get("world_data_version"),
                                                    "base_recipe": info.get("base_recipe"),
                                                    "pretrain_time_s": info.get("time_s"),
                                                    "base_scores": info.get("scores"), "ceilings": scores}
                print(f"{kind}-s{p}: " + ", ".join(f"{t} {v}" for t, v in scores.items()), flush=True)
    if out.exists():  # merge into what another call wrote meanwhile (calls for other seeds may run side by side)
        done = json.loads(out.read_text())
        doc["towers"], doc["instances"] = done["towers"] | doc["towers"], done["instances"] | doc["instances"]
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
