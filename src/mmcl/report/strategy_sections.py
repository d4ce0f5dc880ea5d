"""Report sections that strategies leave files for: the task-similarity matrix (tir_ewc, tir_mas, eproj with
expand=similarity), EProj's routing accuracy and expansion decisions, and LLaCA's measured EMA weights."""

from __future__ import annotations

import json
from pathlib import Path

from mmcl.report.plots import plot_similarity, plot_weight_histograms
from mmcl.report.tables import Table, fmt
from mmcl.strategies.eproj import EPROJ_FILE
from mmcl.strategies.llaca import WEIGHTS_SUMMARY, LLaCAOptions
from mmcl.strategies.similarity import SIMILARITY_FILE


def similarity_section(run_dir: Path) -> list[tuple[str, object]]:
    """("h2"/"p"/"img"/"table", content) pieces for task_similarity.json; [] when the run has none."""
    path = run_dir / SIMILARITY_FILE
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    tasks, matrix = data["tasks"], data["matrix"]
    plot_similarity(tasks, matrix, run_dir / "plots" / "similarity.png")
    out: list[tuple[str, object]] = [
        ("h2", "Task similarity"),
        ("p", "P3's similarity S of each pair of tasks (product over media, instruction and answer embeddings of a "
              "sigmoid of the standardised cosine); text embeddings from " + str(data.get("text_encoder")) + "."),
        ("img", "plots/similarity.png"),
        ("table", Table(["task", *tasks], [[a, *(fmt(v, 3) for v in row)] for a, row in zip(tasks, matrix)])),
    ]
    if data.get("reweighting"):
        rows = [[r["task"], ", ".join(f"{k} {v:.3f}" for k, v in r["similarity"].items())]
                for r in data["reweighting"]]
        out += [("p", "TIR scaled the stored importance before each task by 1 − S(new task, task of the element):"),
                ("table", Table(["before task", "S to each earlier task"], rows))]
    return out


def eproj_section(run_dir: Path) -> list[tuple[str, object]]:
    """Routing accuracy per task after each task, and the expansion decisions, from eproj.json."""
    path = run_dir / EPROJ_FILE
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    routing = data.get("routing_accuracy", [])
    tasks = list(dict.fromkeys(t for r in routing for t in r["accuracy"]))
    out: list[tuple[str, object]] = [
        ("h2", "EProj routing"),
        ("p", "Share of each task's test records routed to that task's own expert (%), after each task."),
        ("table", Table(["after", *tasks], [[r["after"], *(fmt(r["accuracy"].get(t), 1) for t in tasks)]
                                           for r in routing])),
    ]
    decisions = data.get("decisions", [])
    if decisions:
        rows = [[d["task"], str(d["expert"]), d["decision"], d.get("most_similar", "—"),
                 fmt(d.get("similarity"), 3)] for d in decisions]
        out += [("p", "Expert per task (expansion decisions):"),
                ("table", Table(["task", "expert", "decision", "most similar earlier task", "S"], rows))]
    return out


def llaca_section(run_dir: Path) -> list[tuple[str, object]]:
    """The distribution of LLaCA's adaptive weight per task (llaca_weights.json): how often it fell back to its
    base value, its mean and range, and a histogram plot."""
    path = run_dir / WEIGHTS_SUMMARY
    if not path.is_file():
        return []
    summary = json.loads(path.read_text())
    base = _llaca_base(run_dir)
    plot_weight_histograms(summary, base, run_dir / "plots" / "llaca_weights.png")
    rows = [[task, str(d["steps"]), f"{d['weights']:,}",
             fmt(None if d["fallback_share"] is None else 100 * d["fallback_share"], 1),
             f"{d['mean']:.3g}" if d["mean"] is not None else fmt(None), f"{d['min']:.3g}", f"{d['max']:.3g}"]
            for task, d in summary.items()]
    return [
        ("h2", "LLaCA's adaptive weight"),
        ("p", "Measured at every optimizer step for every trainable tensor (llaca_weights.jsonl): α = K(1 + ‖g‖₁) / "
              "(‖θ − θ*‖₁ · ‖g − g_prev‖₁), replaced by the base value when it is not in (0, 1) or cannot be "
              "computed (every tensor at a task's first step)." + (f" Base value: {base:g}." if base else "")),
        ("img", "plots/llaca_weights.png"),
        ("table", Table(["task", "steps", "updates", "fallback to base (%)", "mean α", "min α", "max α"], rows)),
    ]


def _llaca_base(run_dir: Path) -> float | None:
    """LLaCA's base weight from the run's config.yaml (None when not found)."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    for s in cfg.get("strategies", []) if isinstance(cfg, dict) else []:
        if isinstance(s, dict) and "llaca" in s:
            return float((s["llaca"] or {}).get("base", LLaCAOptions.base))
        if s == "llaca":
            return LLaCAOptions.base
    return None
