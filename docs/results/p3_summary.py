"""Tables of RESULTS.md's P3 section from two `mmcl compare` directories (the pretrained and the instruction-tuned
base, and optionally more instruction-tuned instances): per method mean and 95 % t-interval over seeds, the paired
difference from sequential fine-tuning on the same seed (significant when its interval excludes 0), EProj's routing
accuracy, the expansion decisions, the task-similarity matrix, and P3's gate: how much more a method gains over
sequential from the instruction-tuned base than from the pretrained one (paired by stream seed). Usage:

    python docs/results/p3_summary.py runs/p3/pretrained runs/p3/instructed [runs/p3/instructed-s1 ...] \
        > docs/results/p3_tables.md
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from mmcl.single_task import run_complete

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
"""Two-sided 95 % quantile of Student's t by degrees of freedom."""
METRICS = [("final_average_accuracy", "final acc ↑"), ("forgetting", "forgetting ↓"), ("plasticity", "plasticity ↑"),
           ("retention_drop", "retention drop ↓")]


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % t-interval); half-width nan for one value."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, math.nan
    return m, T95[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))


def cell(values: list[float]) -> str:
    m, h = interval(values)
    return f"{m:.1f} ± {h:.1f}"


def delta_cell(values: list[float]) -> str:
    """A paired difference: mean ± t-interval half-width, marked * when the interval excludes 0."""
    m, h = interval(values)
    return f"{m:+.1f} ± {h:.1f}" + (" *" if abs(m) > h else "")


def metric_or_none(run: Path, key: str) -> float | None:
    v = json.loads((run / "metrics.json").read_text())[key]
    v = v["mean"] if isinstance(v, dict) else v
    return None if v is None else float(v)


def metric(run: Path, key: str) -> float:
    v = metric_or_none(run, key)
    assert v is not None, f"{run}: no {key} in metrics.json"
    return v


def runs_of(comparison: Path) -> dict[str, dict[int, Path]]:
    out: dict[str, dict[int, Path]] = {}
    for method in sorted(p for p in comparison.iterdir() if p.is_dir()):
        for run in method.glob("seed-*"):
            if run_complete(run):  # a run still going (or cut off) mid-stream is not a result yet
                out.setdefault(method.name, {})[int(run.name.split("-")[1])] = run
    return out


def bootstrap_excludes_zero(comparison: Path, name: str, key: str) -> bool | None:
    """Whether `mmcl compare`'s paired bootstrap interval (seeds and test records) of `name` − sequential excludes 0;
    None when the directory has no comparison.json for these runs yet."""
    path = comparison / "comparison.json"
    if not path.is_file():
        return None
    vs = json.loads(path.read_text())["methods"].get(name, {}).get("vs_baseline", {}).get(key)
    return None if vs is None or vs.get("ci") is None else bool(vs["significant"])


def method_table(comparison: Path, order: list[str]) -> str:
    """Per method: mean ± t-interval of each metric, and the paired Δ from sequential of final accuracy, forgetting
    and retention drop, marked * when both the t-interval and the bootstrap interval exclude 0, † when one does."""
    runs = runs_of(comparison)
    base = runs["sequential"]
    keys = ("final_average_accuracy", "forgetting", "retention_drop")
    head = ["method", "seeds", *(h for _, h in METRICS), "Δ final vs seq.", "Δ forgetting vs seq.",
            "Δ retention drop vs seq."]
    lines = ["| " + " | ".join(head) + " |", "| --- | ---: |" + " ---: |" * (len(head) - 2)]
    for name in [m for m in order if m in runs]:
        seeds = sorted(runs[name])
        cells = [cell([metric(runs[name][s], k) for s in seeds]) for k, _ in METRICS]
        deltas = []
        for key in keys:
            if name == "sequential":
                deltas.append("—")
                continue
            m, h = interval([metric(runs[name][s], key) - metric(base[s], key) for s in seeds if s in base])
            votes = [not math.isnan(h) and abs(m) > h, bootstrap_excludes_zero(comparison, name, key)]
            mark = " *" if all(votes) else " †" if any(votes) else ""
            deltas.append(f"{m:+.1f} ± {h:.1f}{mark}")
        lines.append(f"| {name} | {len(seeds)} | " + " | ".join(cells + deltas) + " |")
    return "\n".join(lines)


def tir_table(comparison: Path) -> str:
    """TIR against its own base method (same λ, same seed): paired differences of final accuracy and forgetting."""
    runs = runs_of(comparison)
    lines = ["| TIR vs | Δ final acc | Δ forgetting |", "| --- | ---: | ---: |"]
    for lam in ("", "[lambda_=1]"):
        for base in ("ewc", "mas"):
            a, b = runs.get(f"tir_{base}{lam}"), runs.get(f"{base}{lam}")
            if not a or not b:
                continue
            cells = [delta_cell([metric(a[s], key) - metric(b[s], key) for s in sorted(a) if s in b])
                     for key in ("final_average_accuracy", "forgetting")]
            lines.append(f"| tir_{base}{lam} − {base}{lam} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def routing_table(comparison: Path) -> str:
    runs = runs_of(comparison)
    lines = ["| method | routing accuracy, final row (mean over tasks) | experts used | decisions (seed 0) |",
             "| --- | ---: | ---: | --- |"]
    for name in [m for m in runs if m.startswith("eproj")]:
        accs, experts = [], []
        decisions = ""
        for seed, run in sorted(runs[name].items()):
            data = json.loads((run / "eproj.json").read_text())
            final = data["routing_accuracy"][-1]["accuracy"]
            accs.append(statistics.fmean(final.values()))
            experts.append(len(set(data["slot_expert"])))
            if seed == 0:
                decisions = ", ".join(f"{d['task']}→{d['expert']}" + (f" (S {d['similarity']:.2f})"
                                                                      if "similarity" in d else "")
                                      for d in data["decisions"])
        lines.append(f"| {name} | {cell(accs)} | {statistics.fmean(experts):.1f} | {decisions} |")
    return "\n".join(lines)


def similarity_table(comparison: Path) -> str:
    run = runs_of(comparison)["tir_ewc"][0]
    data = json.loads((run / "task_similarity.json").read_text())
    tasks = data["tasks"]
    lines = ["| | " + " | ".join(tasks) + " |", "| --- |" + " ---: |" * len(tasks)]
    lines += [f"| {a} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for a, row in zip(tasks, data["matrix"])]
    return "\n".join(lines) + f"\n\n(text embeddings: {data['text_encoder']})"


def gate_table(pretrained: Path, instructed: Path, order: list[str]) -> str:
    """P3's gate as a number: (method − sequential) from the instructed base minus (method − sequential) from the
    pretrained base, paired by stream seed; positive for final accuracy (negative for forgetting) means the method
    helps more after instruction tuning."""
    pre, ins = runs_of(pretrained), runs_of(instructed)
    head = ["method", "Δ final, pretrained", "Δ final, instructed", "instructed − pretrained",
            "Δ forgetting, pretrained", "Δ forgetting, instructed", "instructed − pretrained"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for name in [m for m in order if m != "sequential" and m in pre and m in ins]:
        seeds = [s for s in sorted(pre[name]) if s in ins[name] and s in pre["sequential"] and s in ins["sequential"]]
        cells = []
        for key in ("final_average_accuracy", "forgetting"):
            d_pre = [metric(pre[name][s], key) - metric(pre["sequential"][s], key) for s in seeds]
            d_ins = [metric(ins[name][s], key) - metric(ins["sequential"][s], key) for s in seeds]
            cells += [delta_cell(v) for v in (d_pre, d_ins, [b - a for a, b in zip(d_pre, d_ins)])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(pretrained: str, instructed: str, *more: str) -> None:
    order = ["sequential", "ewc", "tir_ewc", "mas", "tir_mas", "ewc[lambda_=1]", "tir_ewc[lambda_=1]", "mas[lambda_=1]",
             "tir_mas[lambda_=1]", "lwf", "replay", "eproj", "eproj[expand=similarity]"]
    bases = [("pretrained base", Path(pretrained)), ("instruction-tuned base", Path(instructed))]
    bases += [(f"instruction-tuned base, instance {i} ({Path(p).name})", Path(p)) for i, p in enumerate(more, 2)]
    for title, path in bases:
        print(f"#### {title}\n\n{method_table(path, order)}\n\nTIR against its base method (paired by seed):\n\n"
              f"{tir_table(path)}\n\nEProj routing:\n\n{routing_table(path)}\n")
    for title, path in bases[1:]:
        print(f"#### P3's gate: gain over sequential from the {title} minus from the pretrained base (paired by seed)"
              f"\n\n{gate_table(Path(pretrained), path, order)}\n")
    print(f"#### Task similarity (tir_ewc, seed 0, pretrained base)\n\n{similarity_table(Path(pretrained))}\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
