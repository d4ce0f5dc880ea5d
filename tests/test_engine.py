"""End-to-end runs of the engine and the CLI on the micro stream: outputs, resume, determinism, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import die_at_row

from mmcl.cli import main
from mmcl.config import ConfigError, load_config
from mmcl.engine import checkpoint as ck
from mmcl.engine import loop
from mmcl.engine.loop import run
from mmcl.engine.setup import build_context
from mmcl.seeding import hold_out

pytestmark = pytest.mark.integration


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


def test_cli_run_writes_the_run_directory(micro_overrides, capsys):
    overrides = micro_overrides("e2e")
    assert main(["run", *overrides, "--no-progress"]) == 0
    run_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")))
    out = capsys.readouterr().out
    assert "report.md" in out

    matrix = json.loads((run_dir / "matrix.json").read_text())
    assert matrix["tasks"] == ["color_qa", "shape_cls", "count"]
    assert matrix["retention"] == ["lang_arith"]
    assert [r["after"] for r in matrix["rows"]] == [None, "color_qa", "shape_cls", "count"]
    for row in matrix["rows"]:
        assert set(row["scores"]) == {"color_qa", "shape_cls", "count", "lang_arith"}
        assert all(0 <= v <= 100 for v in row["scores"].values())

    env = json.loads((run_dir / "environment.json").read_text())  # what the run ran on, for reproduction
    assert env["world_size"] == 1 and env["device"] == "cpu" and env["global_batch_size"] == 8
    assert env["packages"]["torch"].startswith("2.13.0") and env["packages"]["transformers"] == "5.23.0"

    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("final_average_accuracy", "average_incremental_accuracy", "forgetting", "backward_transfer",
                "forward_transfer", "plasticity", "retention_drop"):
        assert key in metrics
    assert metrics["num_tasks_trained"] == 3

    # predictions per row and task, one line per test record (micro world: 8)
    for row in range(4):
        for task in ("color_qa", "shape_cls", "count", "lang_arith"):
            lines = (run_dir / "predictions" / f"row-{row:02d}" / f"{task}.jsonl").read_text().splitlines()
            assert len(lines) == 8
            assert set(json.loads(lines[0])) == {"id", "prompt", "prediction", "references", "score"}

    cost = json.loads((run_dir / "cost.json").read_text())
    assert cost["steps"] == 3 * 3  # 24 records / batch 8 = 3 steps per task, one epoch
    assert cost["trainable_parameters"] > 0 and cost["total_parameters"] >= cost["trainable_parameters"]
    assert cost["time_per_step_s"] > 0

    config = load_config(run_dir / "config.yaml")
    assert config.name == "e2e" and config.train.batch_size == 8

    # one checkpoint per task boundary, pruned to the last two; only safetensors and JSON, never a pickle
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert names == ["task-02-shape_cls", "task-03-count"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "task-03-count"
    for f in (run_dir / "checkpoints").rglob("*"):
        if f.is_file():
            assert f.suffix in {".safetensors", ".json", ""}, f
            assert not ck.is_pickle(f), f
    assert (run_dir / "report.md").exists() and (run_dir / "report.html").exists()
    assert list((run_dir / "plots").glob("*.png"))
    assert (run_dir / "skipped.jsonl").read_text() == ""

    # the metrics verb reads the matrix back
    assert main(["metrics", str(run_dir / "matrix.json"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["final_average_accuracy"] == pytest.approx(metrics["final_average_accuracy"])


@pytest.mark.parametrize("extra", [{}, {"train.early_stopping_patience": 1, "train.epochs": 2,
                                       "train.val_fraction": 0.25}], ids=["plain", "early-stopping"])
def test_resume_after_interruption_gives_bitwise_the_same_run(micro_overrides, monkeypatch, extra):
    full = run(load_config(None, micro_overrides("full", **extra)), progress=False, log=lambda *a: None)

    # interrupted: evaluation after task 2 dies, so the task-2 checkpoint is never written
    real = die_at_row(monkeypatch, 2)
    cfg = load_config(None, micro_overrides("cut", **extra))
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False, log=lambda *a: None)
    assert (cfg.run_dir / "checkpoints" / "latest").read_text().strip() == "task-01-color_qa"
    monkeypatch.setattr(loop, "evaluate_row", real)
    resumed = run(cfg, resume=True, progress=False, log=lambda *a: None)

    a, b = json.loads((full / "matrix.json").read_text()), json.loads((resumed / "matrix.json").read_text())
    assert a["rows"] == b["rows"]
    wa, wb = _final_weights(full), _final_weights(resumed)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la, lb = json.loads((full / "losses.json").read_text()), json.loads((resumed / "losses.json").read_text())
    assert la == lb
    ca, cb = (json.loads((d / "cost.json").read_text()).get("early_stopping") for d in (full, resumed))
    assert ca == cb and (len(ca) == 3 if extra else ca == {})


def test_same_seed_same_run_other_seed_differs(micro_overrides):
    quiet = dict(progress=False, log=lambda *a: None)
    r1 = run(load_config(None, micro_overrides("s1", tasks=1)), **quiet)
    r2 = run(load_config(None, micro_overrides("s2", tasks=1)), **quiet)
    r3 = run(load_config(None, micro_overrides("s3", tasks=1, seed=1)), **quiet)
    l1, l2, l3 = (json.loads((r / "losses.json").read_text()) for r in (r1, r2, r3))
    assert l1 == l2
    assert l1 != l3
    w1, w2 = _final_weights(r1), _final_weights(r2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_resume_refuses_a_different_config(micro_overrides):
    cfg = load_config(None, micro_overrides("x", tasks=1))
    run(cfg, progress=False, log=lambda *a: None)
    changed = load_config(None, micro_overrides("x", tasks=1, **{"train.lr": 0.5, "seed": 3}))
    with pytest.raises(ValueError, match=r"(?s)seed: config=3, checkpoint=0.*train.lr: config=0.5, checkpoint=0.001"):
        run(changed, resume=True, progress=False, log=lambda *a: None)


def test_a_second_run_into_the_same_directory_is_refused(micro_overrides):
    cfg = load_config(None, micro_overrides("twice", tasks=1))
    run(cfg, progress=False, log=lambda *a: None)
    with pytest.raises(FileExistsError, match="--resume"):
        run(cfg, progress=False, log=lambda *a: None)


def test_bad_records_stop_the_run_before_training(micro_overrides, micro_world, tmp_path):
    task = tmp_path / "broken"
    task.mkdir()
    src = micro_world / "tasks" / "color_qa"
    (task / "task.yaml").write_text((src / "task.yaml").read_text().replace("data_root: .", f"data_root: {src}"))
    lines = (src / "train.jsonl").read_text().splitlines()
    lines[2] = "{not json"
    rec = json.loads(lines[4])
    rec["conversations"][1]["value"] = " "
    lines[4] = json.dumps(rec)
    (task / "train.jsonl").write_text("\n".join(lines) + "\n")
    (task / "test.jsonl").write_text((src / "test.jsonl").read_text())
    stream = tmp_path / "s.yaml"
    stream.write_text(f"name: s\ntasks: [{task}]\n")
    overrides = micro_overrides("bad", tasks=1) + [f"data.stream={stream}"]
    with pytest.raises(Exception, match=r"(?s)train.jsonl:3: invalid JSON.*train.jsonl:5: conversations\[1\] is an empty"):
        run(load_config(None, overrides), progress=False, log=lambda *a: None)
    assert not (tmp_path / "bad" / "checkpoints").exists()

    # skip policy: the run completes and lists exactly the skipped records
    overrides += ["data.on_bad_record=skip", "data.max_bad_fraction=0.2", "output_dir=" + str(tmp_path / "skip")]
    run_dir = run(load_config(None, overrides), progress=False, log=lambda *a: None)
    skipped = [json.loads(line) for line in (run_dir / "skipped.jsonl").read_text().splitlines()]
    assert [s["line"] for s in skipped] == [3, 5]
    assert json.loads((run_dir / "cost.json").read_text())["samples"] == 22


def test_lora_and_joint_compose_and_run(micro_overrides):
    run_dir = run(load_config(None, micro_overrides("lj", tasks=2, strategies="[lora,joint]")), progress=False,
                  log=lambda *a: None)
    cost = json.loads((run_dir / "cost.json").read_text())
    assert cost["trainable_parameters"] < cost["total_parameters"] / 2  # LoRA + projector only
    assert cost["steps"] == 3 + 6  # joint trains task 2 on both tasks' data
    weights = _final_weights(run_dir)
    assert any("lora_A" in k for k in weights)


def test_unknown_strategy_and_bad_composition_are_refused_before_training(micro_overrides):
    with pytest.raises(ConfigError, match="unknown strategy 'ewk'"):
        run(load_config(None, micro_overrides("u", strategies="[ewk]")), progress=False, log=lambda *a: None)
    with pytest.raises(ConfigError, match="strategies.lora.rank: unknown key; valid keys: r, alpha"):
        run(load_config(None, micro_overrides("u2", strategies="[lora]") + ["strategies.lora.rank=4"]),
            progress=False, log=lambda *a: None)


def test_stream_runs_from_a_saved_llava_checkpoint(micro_overrides, micro_model, tmp_path):
    from support import tiny_llava
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro_model / "tokenizer")
    llava_dir = tmp_path / "llava-tiny"
    tiny_llava(tok, -1, "default").save_pretrained(llava_dir)
    tok.save_pretrained(llava_dir)
    before = {p.name: p.read_bytes() for p in llava_dir.iterdir()}

    # mapped onto the composition (no processor files needed: the mapping reads the tower's own image size); the
    # native LLaVA backend runs in tests/test_backend_runs.py
    run_dir = run(load_config(None, micro_overrides("from-llava", tasks=1) + [f"model.path={llava_dir}",
                                                                           "model.backend=composition"]),
                  progress=False, log=lambda *a: None)
    matrix = json.loads((run_dir / "matrix.json").read_text())
    assert [r["after"] for r in matrix["rows"]] == [None, "color_qa"]
    assert json.loads((run_dir / "cost.json").read_text())["steps"] == 3
    # the base model's files are never modified
    assert {p.name: p.read_bytes() for p in llava_dir.iterdir()} == before

    with pytest.raises(ConfigError, match="inside the base model's directory"):
        run(load_config(None, micro_overrides("inside", tasks=1) + [f"model.path={llava_dir}",
                                                                     "model.backend=composition",
                                                                     f"output_dir={llava_dir / 'runs'}"]),
            progress=False, log=lambda *a: None)


def test_compare_aggregates_methods_over_seeds_and_skips_finished_runs(micro_overrides, tmp_path, capsys):
    overrides = [o for o in micro_overrides("cmp", tasks=2) if not o.startswith(("name=", "output_dir="))]
    overrides += ["train.max_steps=1", "eval.retention=false"]
    args = ["compare", *overrides, "--methods", "sequential,lora+joint", "--seeds", "0,1", "--out",
            str(tmp_path / "cmp"), "--no-progress"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["methods"]
    assert list(summary) == ["sequential", "lora+joint"]
    for label in summary:
        assert summary[label]["final_average_accuracy"]["n"] == 2
        assert summary[label]["trainable_parameters"]["mean"] > 0
    # the mean over seeds is the mean of the two runs' metrics
    finals = [json.loads((tmp_path / "cmp" / "sequential" / f"seed-{s}" / "metrics.json").read_text())
              ["final_average_accuracy"] for s in (0, 1)]
    # (recomputed from the per-record scores: equal up to the matrix's rounding to 4 decimals)
    assert summary["sequential"]["final_average_accuracy"]["mean"] == pytest.approx(sum(finals) / 2, abs=1e-3)
    lo, hi = summary["sequential"]["final_average_accuracy"]["ci"]  # the bootstrap interval holds the mean
    assert lo <= summary["sequential"]["final_average_accuracy"]["mean"] <= hi
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| sequential |" in md
    # the final score per task is the mean of the runs' last matrix rows, and every run's matrix is listed
    last = [json.loads((tmp_path / "cmp" / "sequential" / f"seed-{s}" / "matrix.json").read_text())["rows"][-1]
            ["scores"]["shape_cls"] for s in (0, 1)]
    assert summary["sequential"]["final_per_task"]["shape_cls"]["mean"] == pytest.approx(sum(last) / 2, abs=1e-3)
    assert "## Final score per task" in md and "| method | color_qa | shape_cls |" in md
    assert all(f"### {m}, seed-{s}" in md for m in ("sequential", "lora+joint") for s in (0, 1))
    assert (tmp_path / "cmp" / "accuracy_vs_forgetting.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(args) == 0  # a re-run skips the four complete runs
    assert capsys.readouterr().out.count("complete, skipped") == 4
    # a run cut off before its first checkpoint (only its config and row 0 written) is started again, not refused
    cut = tmp_path / "cmp" / "sequential" / "seed-1"
    for p in cut.iterdir():
        if p.name not in ("config.yaml", "predictions"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("complete, skipped") == 3 and "no complete checkpoint" in out
    assert json.loads((cut / "matrix.json").read_text())["rows"][-1]["scores"]["shape_cls"] == pytest.approx(last[1])


@pytest.mark.parametrize("stream, strategies, says", [
    ("image", ("sequential", "joint"), "joint training on every task seen so far"),
    ("micl", ("sequential", "moincl"), "MoInCL (pseudo targets"),
])
def test_demo_runs_both_strategies_and_prints_where_the_reports_are(stream, strategies, says, micro_world, micro_model,
                                                                    monkeypatch, tmp_path, capsys):
    """`mmcl demo [--stream micl] --quick`, with the built-in world and model swapped for the micro ones."""
    import mmcl.builtin

    monkeypatch.setattr(mmcl.builtin, "builtin_world", lambda **_: micro_world)
    monkeypatch.setattr(mmcl.builtin, "builtin_model", lambda **_: micro_model)
    out = tmp_path / "demo"
    assert main(["demo", "--stream", stream, "--quick", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert says in text
    for s in strategies:
        assert f"report ({s}): {out / s / 'report.md'}" in text and (out / s / "report.md").is_file()
        tasks = json.loads((out / s / "matrix.json").read_text())["tasks"]
        assert (tasks[0], len(tasks)) == (("color_qa", 7) if stream == "image" else ("audio_cap", 6))
    assert main(["demo", "--stream", stream, "--quick", "--out", str(out), "--no-progress"]) == 2  # not empty


def test_image_demo_trains_with_the_image_recipes_epochs_batch_and_lr(tmp_path) -> None:
    """`mmcl demo` cannot read configs/ (not installed with the package), so it repeats the image recipe's training
    settings; this keeps the two in step (the single-task ceilings in docs/world.md are measured with the recipe)."""
    from mmcl.commands import demo_config

    recipe = load_config(Path(__file__).resolve().parents[1] / "configs/image/base.yaml", []).train
    demo = demo_config("sequential", "sequential", tmp_path, quick=False).train
    assert (demo.epochs, demo.batch_size, demo.lr, demo.schedule, demo.warmup_ratio) == \
        (recipe.epochs, recipe.batch_size, recipe.lr, recipe.schedule, recipe.warmup_ratio)


# -- early stopping ---------------------------------------------------------------------------------------------------


def test_hold_out_is_seeded_disjoint_and_keeps_file_order() -> None:
    records = list(range(20))
    train, val = hold_out(records, 0.25, seed=7)
    assert len(val) == 5 and sorted(train + val) == records and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)
    assert hold_out(records, 0.25, seed=7) == (train, val) and hold_out(records, 0.25, seed=8)[1] != val
    assert [len(v) for _, v in (hold_out(records[:3], 0.01, 0), hold_out(records[:3], 0.99, 0))] == [1, 2]


def test_early_stopping_validation_records(micro_overrides, micro_world, tmp_path):
    """Held out from train (seeded, per task) unless the task has its own val split; nothing held out when off."""
    task_dir = tmp_path / "color_qa_val"
    import shutil

    shutil.copytree(micro_world / "tasks" / "color_qa", task_dir)
    manifest = task_dir / "task.yaml"
    manifest.write_text(manifest.read_text().replace("test: test.jsonl}", "test: test.jsonl, val: test.jsonl}"))
    stream = tmp_path / "val.yaml"
    stream.write_text(json.dumps({"name": "v", "tasks": [str(task_dir), str(micro_world / "tasks" / "shape_cls")]}))
    base = micro_overrides("es-records", tasks=2) + [f"data.stream={stream}"]
    ctx, _, _ = build_context(load_config(None, base + ["train.early_stopping_patience=2",
                                                             "train.val_fraction=0.25"]), log=lambda *a: None)
    own, held = ctx.records["color_qa"], ctx.records["shape_cls"]
    assert [r.id for r in own["val"]] == [r.id for r in own["test"]] and len(own["train"]) == 24
    assert (len(held["train"]), len(held["val"])) == (18, 6)
    assert not {r.id for r in held["train"]} & {r.id for r in held["val"]}
    off, _, _ = build_context(load_config(None, base), log=lambda *a: None)
    assert "val" not in off.records["shape_cls"] and len(off.records["shape_cls"]["train"]) == 24


def test_early_stopping_stops_after_patience_epochs_without_a_better_score(micro_overrides):
    # lr 1e-12: the weights barely move, so the validation score never improves after the first epoch
    over = {"train.lr": 1e-12, "train.epochs": 5, "train.early_stopping_patience": 2, "train.val_fraction": 0.25,
            "eval.retention": "false", "data.test_limit": 2, "eval.max_new_tokens": 3}
    run_dir = run(load_config(None, micro_overrides("es-stop", tasks=2, **over)), progress=False, log=lambda *a: None)
    cost = json.loads((run_dir / "cost.json").read_text())
    for task in ("color_qa", "shape_cls"):
        record = cost["early_stopping"][task]
        assert record["epochs"] == 3 and record["best_epoch"] == 1, record  # best at 1, then 2 epochs without gain
        assert len(set(record["val_scores"])) == 1
    assert cost["steps"] == 2 * 3 * 3  # 18 training records in batches of 8: 3 steps per epoch, 3 epochs, 2 tasks
    report = (run_dir / "report.md").read_text()
    assert "## Early stopping" in report and "| color_qa | 3 | 1 |" in report


def test_early_stopping_keeps_the_weights_of_the_best_epoch(micro_overrides):
    """The task ends with the weights its best validation epoch had (a probe records the weights each epoch ends
    with, which are the ones validated); with a learning rate this high the later epochs are not better."""
    from mmcl.strategies import Strategy, register_strategy
    from mmcl.strategies.registry import _REGISTRY

    seen: list[dict[str, torch.Tensor]] = []

    class EpochProbe(Strategy):
        """Records the trainable weights at every epoch end (test only)."""

        def on_epoch_end(self, ctx):
            seen.append({n: p.detach().clone() for n, p in ctx.trainable_parameters()})

    register_strategy("epoch_probe_test")(EpochProbe)
    try:
        over = {"train.lr": 5e-2, "train.epochs": 3, "train.early_stopping_patience": 3, "train.val_fraction": 0.25,
                "eval.retention": "false", "data.test_limit": 2, "eval.max_new_tokens": 3,
                "strategies": "[epoch_probe_test]"}
        run_dir = run(load_config(None, micro_overrides("es-best", tasks=1, **over)), progress=False,
                      log=lambda *a: None)
    finally:
        _REGISTRY.pop("epoch_probe_test", None)
    record = json.loads((run_dir / "cost.json").read_text())["early_stopping"]["color_qa"]
    assert record["epochs"] == len(seen) == 3 and record["best_epoch"] < 3, record
    final = _final_weights(run_dir)
    best, last = seen[record["best_epoch"] - 1], seen[-1]
    assert all(torch.equal(final[n], best[n]) for n in best)
    assert any(not torch.equal(final[n], last[n]) for n in last)  # the last epoch's weights were not kept


def test_sharded_evaluation_generates_only_its_share_and_scores_the_gathered_answers(micro_overrides):
    """Rank 0 of 2 generates records 0, 2, 4; the other rank's answers arrive through `gather` (here: a stand-in
    giving "zzz" for records 1 and 3) and every record is scored in file order."""
    from mmcl.eval.generate import evaluate_task

    ctx, _, _ = build_context(load_config(None, micro_overrides("shard", tasks=1, **{"data.test_limit": 5})),
                              log=lambda *a: None)
    task = ctx.stream.tasks[0]
    records = ctx.records[task.name]["test"]
    full = ctx.score(task, "test")
    calls = []

    def gather(pairs):
        calls.append([i for i, _ in pairs])
        return pairs + [(1, "zzz"), (3, "zzz")]

    half = evaluate_task(ctx.model, ctx.processor, ctx.collator(left_pad=True), task, records, batch_size=4,
                         device=ctx.device, max_new_tokens=ctx.config.eval.max_new_tokens, shard=(0, 2), gather=gather)
    assert calls == [[0, 2, 4]]
    got = [p["prediction"] for p in half.predictions]
    assert got[1] == got[3] == "zzz" and [got[i] for i in (0, 2, 4)] == [full.predictions[i]["prediction"]
                                                                        for i in (0, 2, 4)]


@pytest.mark.parametrize(("precision", "dtype"), [("no", torch.float32), ("bf16", torch.bfloat16)])
def test_evaluation_runs_at_the_training_precision(micro_overrides, precision, dtype):
    """The accuracy matrix is measured at the precision the run trains at: under train.precision=bf16 the language
    model's linear layers compute in bf16 during scoring (generation and log-likelihood alike), fp32 otherwise."""
    from mmcl.engine.evaluation import score_task

    ctx, _, _ = build_context(load_config(None, micro_overrides(f"prec-{precision}", tasks=1, **{
        "data.test_limit": 2, "train.precision": precision})), log=lambda *a: None)
    seen = set()
    linear = next(m for m in ctx.model.modules() if isinstance(m, torch.nn.Linear))
    handle = linear.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    try:
        for task in [ctx.stream.tasks[0], *ctx.stream.retention]:
            score_task(ctx, task)
    finally:
        handle.remove()
    assert seen == {dtype}
