"""P1's continual table: the language change (NLU, NLG, NL; points lost since the base model, P1's sign) after every
stage of the P1 stream, per method, mean over seeds, read from each run's metrics.json (`language_change.per_row`).

    python docs/results/p1_language_rows.py runs/p1 > docs/results/p1_language_rows.md
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def table(root: Path) -> str:
    lines = []
    for method in sorted(p for p in root.iterdir() if p.is_dir()):
        runs = sorted(method.glob("seed-*/metrics.json"))
        if not runs:
            continue
        metrics = [json.loads(p.read_text()) for p in runs]
        stages = [json.loads((p.parent / "matrix.json").read_text())["tasks"] for p in runs][0]
        if not lines:
            lines += ["| method | kind | " + " | ".join(f"after {s}" for s in stages) + " |",
                      "| --- | --- | " + " | ".join("---:" for _ in stages) + " |"]
        for kind in ("nlu", "nlg", "nl"):
            cells = [statistics.fmean(m["language_change"]["per_row"][j][kind] for m in metrics)
                     for j in range(len(stages))]
            lines.append(f"| {method.name} | {kind.upper()} Δ | " + " | ".join(f"{c:+.2f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print("Mean over seeds; positive = skill lost since the base model (P1's sign); 200 NLU items (one is 0.5 "
          "points), 220 NLG sentences.\n")
    print(table(Path(sys.argv[1])))
