"""Report sections that strategies leave files for: the task-similarity matrix (tir_ewc, tir_mas, eproj with
expand=similarity) and EProj's routing accuracy and expansion decisions."""

from __future__ import annotations

import json
from pathlib import Path

from mmcl.report.plots import plot_similarity
from mmcl.report.tables import Table, fmt
from mmcl.strategies.eproj import EPROJ_FILE
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
