"""Plots of the accuracy matrix: a heatmap and per-task curves, as deterministic PNGs.

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas) instead of pyplot: no global figure state,
safe in threads, and importing this module never switches the backend of a user's notebook.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from mmcl.eval.metrics import matrix_from_json
from mmcl.report.tables import row_labels

__all__ = ["plot_curves", "plot_matrix"]

_DPI = 120
# No "Software" entry: the PNG bytes then depend only on the data (matplotlib writes no timestamp).
_PNG_METADATA = {"Software": None}
_RC = {"font.size": 9, "axes.titlesize": 10, "figure.titlesize": 11, "svg.hashsalt": "mmcl"}
_MISSING_COLOUR = "#e8e8e8"


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, metadata=_PNG_METADATA)


def _draw_cells(ax: Axes, values: np.ndarray, cmap: Colormap, vmax: float, font: float,
                digits: int = 1) -> AxesImage:
    """Heatmap with the number in each cell (dark text on light cells, white on dark ones)."""
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto")
    for (j, i), v in np.ndenumerate(values):
        if np.isnan(v):
            ax.text(i, j, "–", ha="center", va="center", color="#888888", fontsize=font)
        else:
            ax.text(i, j, f"{v:.{digits}f}", ha="center", va="center", fontsize=font,
                    color="white" if v / vmax > 0.6 else "#1a1a1a")  # fmt: skip
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(values.shape[0]))
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return im


def _tick_style(longest: int) -> dict:
    """Slanted column labels only when names are long enough to collide."""
    return {"rotation": 35, "ha": "right", "rotation_mode": "anchor"} if longest > 6 else {}


def plot_matrix(matrix: dict, path: Path) -> None:
    """Heatmap of the accuracy matrix: rows = evaluations, train tasks on the left, retention tasks apart.

    Cells whose task was trained in that row (the diagonal) are outlined, so forgetting reads as the colour
    fading down each column.
    """
    A, R, tasks, retention = matrix_from_json(matrix)
    labels = row_labels(tasks, A.shape[0])
    finite = np.concatenate([A[np.isfinite(A)], R[np.isfinite(R)]])
    vmax = max(100.0, float(finite.max()) if finite.size else 0.0)  # CIDEr can exceed 100
    cmap = matplotlib.colormaps["YlGn"].with_extremes(bad=_MISSING_COLOUR)
    n_cols = len(tasks) + len(retention)
    longest = max((len(n) for n in tasks + retention), default=4)
    width = 2.0 + 0.8 * max(n_cols, 4) + (0.5 if retention else 0.0) + 1.0
    height = 1.3 + 0.45 * A.shape[0] + 0.06 * min(longest, 30)
    font = 9 if n_cols <= 8 else 8
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(width, height), layout="constrained")
        ratios = [max(len(tasks), 1), len(retention)] if retention else [1]
        axes = fig.subplots(1, len(ratios), width_ratios=ratios, squeeze=False)[0]
        im = _draw_cells(axes[0], A, cmap, vmax, font)
        axes[0].set_title("train tasks")
        axes[0].set_yticklabels(labels)
        axes[0].set_xticklabels(tasks, **_tick_style(longest))
        for i in range(min(len(tasks), A.shape[0] - 1)):
            axes[0].add_patch(Rectangle((i - 0.5, i + 0.5), 1, 1, fill=False, edgecolor="#222222", lw=1.8))
        if retention:
            _draw_cells(axes[1], R, cmap, vmax, font)
            axes[1].set_title("retention (evaluated only)")
            axes[1].set_yticks([])
            axes[1].set_xticklabels(retention, **_tick_style(longest))
        fig.colorbar(im, ax=list(axes), label="score (higher is better)", shrink=0.9, pad=0.02)
        sep = " — " if width >= 9 else "\n"
        fig.suptitle(f"Accuracy matrix{sep}row = model after training; outlined = task just trained")
        _save(fig, path)


def plot_similarity(tasks: list[str], matrix: list[list[float]], path: Path) -> None:
    """Heatmap of a task-similarity matrix (P3's S, in [0, 1], 1 on the diagonal)."""
    values = np.asarray(matrix, dtype=float)
    longest = max((len(n) for n in tasks), default=4)
    side = 2.2 + 0.75 * max(len(tasks), 3)
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(side + 1.0, side), layout="constrained")
        ax = fig.subplots()
        im = _draw_cells(ax, values, matplotlib.colormaps["Blues"], 1.0, 9 if len(tasks) <= 8 else 8, digits=2)
        ax.set_xticklabels(tasks, **_tick_style(longest))
        ax.set_yticklabels(tasks)
        fig.colorbar(im, ax=ax, label="similarity S (P3)", shrink=0.9, pad=0.02)
        fig.suptitle("Task similarity")
        _save(fig, path)


def _colours(n: int) -> list:
    """tab10, then tab20's light variants: neighbouring tasks never share a hue until 10 lines in."""
    if n <= 10:
        return [matplotlib.colormaps["tab10"](k) for k in range(n)]
    tab20 = matplotlib.colormaps["tab20"]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return [tab20(order[k % 20]) for k in range(n)]


def plot_curves(matrix: dict, path: Path) -> None:
    """Score of each task after each training stage; a train task's line starts where it was trained.

    Retention tasks are dashed and start at the initial model, so their drop is the language forgetting.
    """
    A, R, tasks, retention = matrix_from_json(matrix)
    T = A.shape[0] - 1
    x = np.arange(T + 1)
    finite = np.concatenate([A[np.isfinite(A)], R[np.isfinite(R)]])
    top = max(100.0, float(finite.max()) if finite.size else 0.0)
    colours = _colours(len(tasks) + len(retention))
    with matplotlib.rc_context(_RC):
        width = min(max(6.5, 1.5 + 0.75 * (T + 1)), 13.0) + 2.2  # + legend
        fig = Figure(figsize=(width, 4.6 + 0.12 * max(T - 4, 0)), layout="constrained")
        ax = fig.subplots()
        for i, name in enumerate(tasks[:T]):
            xs, ys = x[i + 1 :], A[i + 1 :, i]
            ax.plot(xs, ys, "-o", color=colours[i], ms=4, lw=1.8, label=name)
            ax.plot(xs[:1], ys[:1], "o", color=colours[i], ms=10, mec="white", mew=1.5)  # "trained here"
        for k, name in enumerate(retention):
            ax.plot(x, R[:, k], "--s", color=colours[len(tasks) + k], ms=4, lw=1.6, label=f"{name} (retention)")
        ax.set_xticks(x)
        ax.set_xticklabels(row_labels(tasks, T + 1), rotation=30 if T > 4 else 0, ha="right" if T > 4 else "center")
        ax.set_xlim(-0.3, T + 0.3)
        ax.set_ylim(0, top * 1.04)
        ax.set_ylabel("score")
        ax.grid(True, axis="y", color="#dddddd", lw=0.8)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        if tasks[:T] or retention:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="task")
        ax.set_title("Score per task over training — big dot = just trained; dashed = retention")
        _save(fig, path)


def plot_weight_histograms(summary: dict[str, dict], base: float | None, path: Path) -> None:
    """LLaCA's adaptive EMA weight: per task, the share of (step, tensor) updates in each half-decade bin, on a log
    x axis, with the fallback value marked."""
    tasks = list(summary)
    colours = _colours(len(tasks))
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(7.5, 4.2), layout="constrained")
        ax = fig.subplots()
        for colour, task in zip(colours, tasks):
            h = summary[task]["histogram"]
            edges, counts = np.asarray(h["edges"], dtype=float), np.asarray(h["counts"], dtype=float)
            share = 100 * counts / max(counts.sum(), 1.0)
            ax.stairs(share, edges, color=colour, lw=1.8, label=task)
        if base is not None:
            ax.axvline(base, color="#555555", ls="--", lw=1.0, label=f"fallback {base:g}")
        ax.set_xscale("log")
        ax.set_xlabel("weight α of the new weights (per tensor and step)")
        ax.set_ylabel("share of updates (%)")
        ax.grid(True, axis="y", color="#dddddd", lw=0.8)
        ax.set_axisbelow(True)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="task")
        ax.set_title("LLaCA's adaptive EMA weight, per task")
        _save(fig, path)
