"""The `mmcl` command. Every verb has --help; `mmcl run --help` lists every config key with its default."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EPILOG = """examples:
  mmcl demo                                   sequential vs joint on the built-in image stream, with a report
  mmcl run configs/image/lora.yaml train.lr=3e-4 seed=1
  mmcl run strategies=[lora] name=my-lora     (no recipe file: defaults + overrides)
  mmcl run --resume runs/my-lora              continue after the last completed task
  mmcl data validate path/to/stream.yaml      list every bad record as file:line: reason
  mmcl metrics runs/my-lora/matrix.json --json
"""


def _quiet_hf() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _config_and_overrides(args) -> tuple[str | None, list[str]]:
    """The optional recipe file and the overrides; a first argument with '=' that is no file is an override."""
    overrides = list(args.overrides)
    config = args.config
    if config and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    return config, overrides


def cmd_run(args) -> int:
    from mmcl.config import load_config
    from mmcl.engine.loop import run

    config, overrides = _config_and_overrides(args)
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            print(f"error: {run_dir} holds no run (config.yaml missing); can't resume", file=sys.stderr)
            return 2
        cfg = load_config(config or run_dir / "config.yaml", overrides)
        cfg.output_dir = str(run_dir)
    else:
        cfg = load_config(config, overrides)
    run_dir = run(cfg, resume=bool(args.resume), progress=not args.no_progress)
    print(f"\nrun directory: {run_dir}\nreport:        {run_dir / 'report.md'}  (and report.html)")
    return 0


DEMOS = {
    "image": ("builtin:image", ("sequential", "joint")),
    "micl": ("builtin:micl1", ("sequential", "moincl")),
}
"""--stream of `mmcl demo`: the built-in stream and the two strategies it compares."""


def demo_config(name: str, strategy: str, out: Path, quick: bool, stream: str = "builtin:image"):
    from mmcl.config import load_config

    overrides = [f"name={name}", f"output_dir={out / name}", f"strategies=[{strategy}]", f"data.stream={stream}"]
    if quick:  # for tests and impatient people: fewer records and steps
        overrides += ["data.train_limit=48", "data.test_limit=16", "train.epochs=1"]
    cfg = load_config(None, overrides)
    if strategy == "joint":
        # Joint training re-trains on the growing union (about 4x the steps of sequential over 7 tasks); the demo
        # gives it the same number of steps per task as sequential, drawn from every task seen so far.
        from mmcl.builtin import resolve_stream
        from mmcl.engine.train import steps_for

        stream = resolve_stream(cfg.data, progress=False, log=lambda *a: None)
        n = len((stream.tasks[0].split_path("train")).read_text().splitlines())
        cfg.train.max_steps = steps_for(min(n, cfg.data.train_limit or n), cfg.train)
    return cfg


def cmd_demo(args) -> int:
    from mmcl.engine.loop import run
    from mmcl.report import comparison_text

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"error: {out} is not empty; pass --force to replace it or --out another directory", file=sys.stderr)
        return 2
    if args.force and out.exists():
        import shutil

        shutil.rmtree(out)
    stream, strategies = DEMOS[args.stream]
    results = {}
    for strategy in strategies:
        print(f"\n== {strategy} ==")
        run_dir = run(demo_config(strategy, strategy, out, args.quick, stream), progress=not args.no_progress)
        results[strategy] = json.loads((run_dir / "metrics.json").read_text())
    print("\n" + comparison_text(results))
    seq, other = results["sequential"], results[strategies[1]]
    if args.stream == "image":
        print(f"\nSequential fine-tuning forgot {seq['forgetting']:.1f} points per earlier task on average; joint "
              f"training on every task seen so far (same steps per task), the usual upper bound, forgot "
              f"{other['forgetting']:.1f}.")
    else:
        print(f"\nOn P4's modality-inconsistent stream (audio, image and video captioning and QA), sequential "
              f"fine-tuning forgot {seq['forgetting']:.1f} points per earlier task on average; MoInCL (pseudo targets "
              f"from the previous model + instruction distillation) forgot {other['forgetting']:.1f}.")
    for s in results:
        print(f"report ({s}): {out / s / 'report.md'}")
    return 0


def cmd_compare(args) -> int:
    from mmcl.compare import parse_methods, run_comparison

    config, overrides = _config_and_overrides(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    orders = [[t for t in o.split(",") if t] for o in args.orders.split(";")] if args.orders else [None]
    out = run_comparison(None, config, overrides, parse_methods(args.methods), seeds, orders, Path(args.out),
                         progress=not args.no_progress)
    print(f"comparison: {out / 'comparison.md'}")
    return 0


def cmd_synth(args) -> int:
    from mmcl.data.synth import WorldSizes, write_world
    from mmcl.data.synth.speech import SpeechUnavailable

    sizes = WorldSizes(**{k: getattr(args, k) for k in ("train", "test", "lang_train", "align", "image_size")
                          if getattr(args, k) is not None})
    try:
        path = write_world(Path(args.out), seed=args.seed, sizes=sizes, progress=not args.no_progress,
                           speech=args.speech)
    except SpeechUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"world written: {path.parent}\nstreams: " + ", ".join(
        str(path.parent / s) for s in json.loads(path.read_text())["streams"].values()))
    return 0


def cmd_convert(args) -> int:
    from mmcl.data.sources import convert

    splits = args.splits.split(",") if args.splits else None
    for task_dir in convert(args.name, Path(args.src), Path(args.out), splits=splits, limit=args.limit):
        print(f"task written: {task_dir}")
    print(f"check it with: mmcl data validate {args.out}/<task>; list tasks in a stream YAML to train on them")
    return 0


def cmd_validate(args) -> int:
    from mmcl.data.records import validate_path

    total, problems = validate_path(Path(args.path), allow_outside_root=args.allow_outside_root)
    for p in problems:
        print(p)
    print(f"{total} records checked, {len(problems)} bad", file=sys.stderr)
    return 1 if problems else 0


def cmd_pretrain(args) -> int:
    from mmcl.builtin import builtin_world
    from mmcl.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(seed=args.seed)
    cfg.sizes.adapter = args.adapter
    if args.language_epochs:
        cfg.language.epochs = args.language_epochs
    if args.align_epochs:
        cfg.align.epochs = args.align_epochs
    world = Path(args.world) if args.world else builtin_world(progress=not args.no_progress)
    out = pretrain(world, Path(args.out), cfg, progress=not args.no_progress)
    print(f"base model: {out}  (use it with model.path={out})")
    return 0


def cmd_metrics(args) -> int:
    from mmcl.eval.metrics import compute_metrics

    data = json.loads(Path(args.matrix).read_text())
    metrics = compute_metrics(data, source=str(args.matrix))
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        from mmcl.report import summary_table

        print(summary_table(metrics))
    return 0


def cmd_report(args) -> int:
    from mmcl.report import write_report

    path = write_report(Path(args.run_dir))
    print(f"report: {path}  (and {path.with_suffix('.html')})")
    return 0


def cmd_list(args) -> int:
    from mmcl.eval.scorers import list_scorers
    from mmcl.strategies import get_strategy, list_strategies

    what = args.what
    if what in (None, "strategies"):
        print("strategies:")
        for name in list_strategies():
            print(f"  {name:<22} {get_strategy(name)().describe()}")
        from mmcl.config import PRESETS

        print("compositions (expand to a list of strategies):")
        for name, parts in PRESETS.items():
            print(f"  {name:<22} [{', '.join(parts)}]")
    if what in (None, "scorers"):
        print("scorers:\n  " + ", ".join(list_scorers()))
    if what in (None, "tasks"):
        from mmcl.builtin import mmcl_home

        world = Path(args.world) if args.world else mmcl_home() / "world-seed0"
        if not (world / "world.json").exists():
            print(f"tasks: the built-in world is not written yet ({world}); `mmcl data synth` or `mmcl demo` writes it")
            return 0
        from mmcl.data.records import load_stream

        for name, rel in json.loads((world / "world.json").read_text())["streams"].items():
            stream = load_stream(world / rel)
            print(f"stream builtin:{name}  ({stream.path})")
            for t in stream.tasks:
                print(f"  {t.name:<14} {t.modality:<6} {t.type:<15} scorer={t.scorer}")
            for t in stream.retention:
                print(f"  {t.name:<14} {t.modality:<6} retention       scorer={t.scorer}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mmcl.config import field_help

    p = argparse.ArgumentParser(
        prog="mmcl",
        description="Continual instruction tuning of multimodal LLMs: train a model on a stream of tasks with any "
        "continual-learning method, and measure what it forgets.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help, func, description=None, epilog=None):
        sp = sub.add_parser(name, help=help, description=description or help, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(func=func)
        sp.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
        return sp

    keys = "\n".join(f"  {k:<28} {d:<28} {h}" for k, d, h in field_help())
    r = add("run", "run a continual stream: train each task, evaluate every task after it, report", cmd_run,
            epilog=f"config keys (KEY=VALUE overrides, values parsed as YAML):\n{keys}\n\n"
            "strategy options: strategies.NAME.OPTION=VALUE (e.g. strategies.lora.r=16); `mmcl list strategies`")
    r.add_argument("config", nargs="?", help="YAML recipe (optional: defaults + overrides also work)")
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=3e-4")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR after its last complete checkpoint")

    c = add("compare", "run several methods (x seeds x task orders) from the same base and compare them", cmd_compare,
            description="Run each method on the same stream and base for every seed and task order, then write "
            "comparison.md / comparison.json (mean ± std of every metric, time per step, peak memory, trainable "
            "parameters, extra state) and an accuracy-vs-forgetting plot. Completed runs are skipped on a re-run.",
            epilog="example:\n  mmcl compare configs/image/base.yaml --methods sequential,lora,ewc,lora+soft_targets "
            "--seeds 0,1 --out runs/cmp")
    c.add_argument("config", nargs="?", help="YAML recipe shared by every run (optional)")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    c.add_argument("--methods", required=True, help="comma-separated; '+' composes, e.g. sequential,lora+ewc")
    c.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    c.add_argument("--orders", help="task orders separated by ';', tasks by ',' (default: the stream's order)")
    c.add_argument("--out", required=True, help="output directory")

    d = add("demo", "sequential vs joint on the built-in image stream: see forgetting and the upper bound", cmd_demo,
            description="Run the built-in image stream with `sequential` and with `joint` from the same base model "
            "and print a comparison (--stream micl: P4's audio/image/video stream, sequential vs MoInCL). The first "
            "call writes the built-in world and pre-trains the tiny base model (cached in $MMCL_HOME, default "
            "~/.cache/mmcl).")
    d.add_argument("--stream", choices=sorted(DEMOS), default="image",
                   help="image: 7 image tasks, sequential vs joint (default); micl: P4's modality-inconsistent "
                   "stream, order 1, sequential vs moincl")
    d.add_argument("--out", default="runs/demo", help="where the two runs go (default runs/demo)")
    d.add_argument("--force", action="store_true", help="replace an existing --out directory")
    d.add_argument("--quick", action="store_true", help="a smaller, faster demo (fewer records and steps)")

    data = sub.add_parser("data", help="write the built-in world, validate task data")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    s = dsub.add_parser("synth", help="write the built-in offline world (deterministic: same seed, same bytes)")
    s.set_defaults(func=cmd_synth)
    s.add_argument("--out", required=True, help="directory to write (refused if non-empty and not a world)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--speech", action="store_true",
                   help="also mix words spoken by espeak-ng (must be installed) into the audio tasks; the bytes then "
                   "reproduce only with the same espeak-ng version (world.json records it)")
    for k, h in (("train", "train records per stream task"), ("test", "test records per task"),
                 ("lang_train", "train records per language skill"), ("align", "alignment captions"),
                 ("image_size", "image side in pixels")):
        s.add_argument(f"--{k.replace('_', '-')}", dest=k, type=int, help=h)
    from mmcl.data.sources import list_sources

    cv = dsub.add_parser("convert", help="turn a real dataset in its published layout into an mmcl task (no download)",
                         description="Read a dataset from a local directory in its published layout and write an "
                         "mmcl task (task.yaml + JSONL splits; media stay where they are). Layouts: docs/datasets.md.")
    cv.set_defaults(func=cmd_convert)
    cv.add_argument("name", choices=list_sources(), help="dataset")
    cv.add_argument("src", help="the dataset's local directory")
    cv.add_argument("out", help="where to write the task directory")
    cv.add_argument("--splits", help="comma-separated splits (default: every split present)")
    cv.add_argument("--limit", type=int, help="at most N records per split")
    cv.add_argument("--no-progress", action="store_true")
    v = dsub.add_parser("validate", help="check every record of a stream, task or world; print file:line: reason")
    v.set_defaults(func=cmd_validate)
    v.add_argument("path", help="a stream YAML, a task directory or task.yaml, or a world directory")
    v.add_argument("--allow-outside-root", action="store_true", help="accept media paths outside the data root")

    pt = add("pretrain", "pre-train the tiny base model on a world (language skills, then alignment)", cmd_pretrain)
    pt.add_argument("--world", help="world directory (default: the built-in world)")
    pt.add_argument("--out", required=True, help="output model directory")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--language-epochs", type=int)
    pt.add_argument("--align-epochs", type=int)
    pt.add_argument("--adapter", choices=("llava", "p4"), default="llava",
                    help="llava: LLaVA's MLP projector for images, average pooling + linear for audio/video "
                    "(default); p4: P4's LayerNorm + learned conv pooling + linear and P4's cue text for every modality")

    m = add("metrics", "continual-learning metrics of any matrix.json (also published matrices)", cmd_metrics)
    m.add_argument("matrix", help="a matrix.json in mmcl's schema")
    m.add_argument("--json", action="store_true", help="print one JSON object keyed by metric name")

    rp = add("report", "(re)write report.md/report.html of a run directory", cmd_report)
    rp.add_argument("run_dir")

    ls = add("list", "list strategies, tasks and scorers", cmd_list)
    ls.add_argument("what", nargs="?", choices=["strategies", "tasks", "scorers"])
    ls.add_argument("--world", help="world directory for `tasks` (default: the built-in world)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_hf()
    from mmcl.config import ConfigError
    from mmcl.data.records import DataError
    from mmcl.engine.checkpoint import CheckpointError
    from mmcl.engine.resume import ResumeError
    from mmcl.engine.signals import PREEMPTED_EXIT_CODE
    from mmcl.engine.train import Preempted
    from mmcl.models.base import ModelLoadError

    try:
        return args.func(args)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except (ConfigError, DataError, ModelLoadError, CheckpointError, ResumeError, FileExistsError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
