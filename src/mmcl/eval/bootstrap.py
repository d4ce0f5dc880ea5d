"""Bootstrap intervals for continual-learning metrics, over seeds and test records (pure numpy).

A comparison's numbers vary with the seed and with which test records happen to be in the test set. One resample
draws seeds with replacement and, within each drawn seed, the test records of every task with replacement; every
metric is then recomputed from the per-record scores of the resampled records (the task score is the mean of its
records' scores, as every scorer defines it). The 95 % interval is the 2.5th to 97.5th percentile over resamples.

Paired differences use the same draws for both methods (seeds matched by seed, records matched by id), so what
two methods have in common (a hard seed, a hard record) cancels; a difference is significant when its interval
excludes 0. Draws depend only on the number of seeds, the task names and their record counts, and the bootstrap
seed, never on the methods: adding a method to a comparison leaves the other methods' intervals unchanged.
With few seeds the seed part of an interval is somewhat narrow (resampling S seeds gives (S - 1) / S of the
variance of their mean): three seeds are a minimum, more seeds the remedy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mmcl.eval.metrics import language_kind

__all__ = ["METRIC_KEYS", "Draws", "Ratio", "RunSet", "Scores", "batch_metrics", "draw", "final_score_samples",
           "interval", "metric_samples", "per_byte_score", "resampled_matrices", "task_values"]

METRIC_KEYS = ("final_average_accuracy", "average_incremental_accuracy", "forgetting", "backward_transfer",
               "forward_transfer", "plasticity", "retention_drop", "linguistic_forgetting", "nlu_change",
               "nlg_change")
"""The metrics of `mmcl.eval.metrics` that `batch_metrics` computes (retention_drop: the mean over tasks;
nlu_change / nlg_change: P1's language change over the NLU / NLG retention columns, `language_change`)."""

_HM_FLOOR = 1e-3  # as mmcl.eval.metrics: zero scores count as 0.001 in P1's harmonic mean


@dataclass(frozen=True)
class Draws:
    """One bootstrap: `seeds[b, k]` is the seed (index) drawn into slot k of resample b, and `weights[task][b, k, r]`
    the share of record r of `task` in that slot's resampled test set (multinomial counts / n, summing to 1)."""

    seeds: np.ndarray  # (B, S) int
    weights: dict[str, np.ndarray]  # task -> (B, S, n) float

    @property
    def resamples(self) -> int:
        return self.seeds.shape[0]


def draw(num_seeds: int, records: dict[str, int], resamples: int, seed: int = 0) -> Draws:
    """Resample `num_seeds` seeds and, in each drawn slot, the `records[task]` test records of every task."""
    if num_seeds < 1 or resamples < 1:
        raise ValueError(f"bootstrap needs at least one seed and one resample (got {num_seeds}, {resamples})")
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, num_seeds, size=(resamples, num_seeds))
    weights = {}
    for task in sorted(records):  # a fixed order: the same task gets the same draws whatever else is compared
        n = records[task]
        if n < 1:
            raise ValueError(f"task {task!r} has no test records to resample")
        weights[task] = rng.multinomial(n, np.full(n, 1.0 / n), size=(resamples, num_seeds)) / n
    return Draws(seeds, weights)


@dataclass(frozen=True)
class Ratio:
    """Per-record parts of a task whose score is not the mean of per-record scores but a corpus statistic
    ``f(sum(num) / sum(den))`` over its records: the NLG probe's 100 * exp(-total NLL / total bytes)
    (`mmcl.eval.language`). Arrays share one shape, records last; a resample weights num and den alike."""

    num: np.ndarray
    den: np.ndarray
    f: Callable[[np.ndarray], np.ndarray]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.num.shape


def per_byte_score(nll_per_byte: np.ndarray) -> np.ndarray:
    """The NLG probe's score from nats per byte: 100 / per-byte perplexity."""
    return 100.0 * np.exp(-nll_per_byte)


Scores = np.ndarray | Ratio
"""One task's per-record scores (their mean is the task's score) or a `Ratio`."""


def task_values(X: Scores) -> np.ndarray:
    """The task's score over all its records, per leading index (e.g. (seeds, rows))."""
    if isinstance(X, Ratio):
        return X.f(X.num.sum(-1) / X.den.sum(-1))
    return X.mean(-1)


@dataclass(frozen=True)
class RunSet:
    """The per-record scores of one method's runs that share a task order, one run per seed (seeds in the order
    the draws index them). `scores[task]` is (seeds, rows, records): row j = evaluation after j tasks (row 0 before
    training), records in one fixed order shared by every method (matched by id)."""

    tasks: list[str]  # train tasks in training order
    retention: list[str]
    scores: dict[str, Scores]


def _weighted(X: np.ndarray, weights: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """(B, S, rows): the weighted mean of per-record values at every row, for the seed drawn into each slot."""
    S, J, n = X.shape
    B, K = seeds.shape
    # every slot's record weights against every seed's values: (B*K, n) @ (n, S*J) -> (B, K, S, J)
    Y = (weights.reshape(B * K, n) @ X.transpose(2, 0, 1).reshape(n, S * J)).reshape(B, K, S, J)
    return np.take_along_axis(Y, seeds[:, :, None, None], axis=2)[:, :, 0, :]


def _task_rows(X: Scores, weights: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """(B, S, rows): the resampled score of one task at every row, for the seed drawn into each slot."""
    if isinstance(X, Ratio):
        return X.f(_weighted(X.num, weights, seeds) / _weighted(X.den, weights, seeds))
    return _weighted(X, weights, seeds)


def resampled_matrices(runs: RunSet, draws: Draws) -> tuple[np.ndarray, np.ndarray]:
    """The accuracy matrix of every slot of every resample: A (B, S, rows, tasks) and R (B, S, rows, retention)."""
    B, K = draws.seeds.shape

    def stack(names: list[str]) -> np.ndarray:
        if not names:
            J = next(iter(runs.scores.values())).shape[1]
            return np.zeros((B, K, J, 0))
        return np.stack([_task_rows(runs.scores[t], draws.weights[t], draws.seeds) for t in names], axis=-1)

    return stack(runs.tasks), stack(runs.retention)


def batch_metrics(A: np.ndarray, R: np.ndarray, retention: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The metrics of `mmcl.eval.metrics` for a batch of complete accuracy matrices A (..., T+1, T) and retention
    scores R (..., T+1, K) whose columns are named `retention`, as arrays of the batch shape; NaN where the metric
    is undefined (fewer than two tasks for forgetting, BWT and FWT; no retention tasks for the retention metrics; no
    NLU or NLG column for that language change)."""
    J, T = A.shape[-2:]
    if J != T + 1:
        raise ValueError(f"batch_metrics needs complete matrices (T + 1 rows for T tasks), got {J} rows, {T} tasks")
    batch = A.shape[:-2]
    nan = np.full(batch, math.nan)
    rows = np.arange(J)[:, None]
    cols = np.arange(T)[None, :]
    seen = (cols < rows)[1:]  # stage j (1..T) averages tasks i <= j
    out = {
        "final_average_accuracy": A[..., T, :].mean(-1),
        "average_incremental_accuracy": ((A[..., 1:, :] * seen).sum(-1) / seen.sum(-1)).mean(-1),
        "plasticity": A[..., 1:, :].diagonal(axis1=-2, axis2=-1).mean(-1),
    }
    if T >= 2:
        window = (rows > cols) & (rows < T)  # rows i..T-1 (1-based task i = column i-1)
        best = np.where(window, A, -np.inf).max(-2)[..., : T - 1]
        out["forgetting"] = (best - A[..., T, : T - 1]).mean(-1)
        out["backward_transfer"] = (A[..., T, : T - 1] - A[..., 1:T, : T - 1].diagonal(axis1=-2, axis2=-1)).mean(-1)
        diag = A[..., :T, :].diagonal(axis1=-2, axis2=-1)  # A[c][c] for column c: the row before task c+1
        out["forward_transfer"] = (diag[..., 1:] - A[..., 0, 1:]).mean(-1)
    else:
        out["forgetting"] = out["backward_transfer"] = out["forward_transfer"] = nan
    if R.shape[-1]:
        out["retention_drop"] = (R[..., 0, :] - R[..., T, :]).mean(-1)
        out["linguistic_forgetting"] = _harmonic_mean(R[..., 0, :]) - _harmonic_mean(R[..., T, :])
    else:
        out["retention_drop"] = out["linguistic_forgetting"] = nan
    kinds = [language_kind(name) for name in retention]
    for kind in ("nlu", "nlg"):
        cols = [k for k, v in enumerate(kinds) if v == kind]
        out[f"{kind}_change"] = (_harmonic_mean(R[..., 0, cols]) - _harmonic_mean(R[..., T, cols])) if cols else nan
    return {k: out[k] for k in METRIC_KEYS}


def _harmonic_mean(scores: np.ndarray) -> np.ndarray:
    floored = np.where(scores <= 0, _HM_FLOOR, scores)
    return scores.shape[-1] / (1.0 / floored).sum(-1)


def metric_samples(orders: list[RunSet], draws: Draws) -> dict[str, np.ndarray]:
    """Every metric per resample (B,): the mean over slots (seeds) and task orders of each run's metric."""
    per_order = [batch_metrics(*resampled_matrices(runs, draws), runs.retention) for runs in orders]
    return {k: np.mean([m[k] for m in per_order], axis=0).mean(-1) for k in METRIC_KEYS}


def final_score_samples(orders: list[RunSet], draws: Draws) -> dict[str, np.ndarray]:
    """Each task's score after the last row, per resample (B,): mean over slots and task orders."""
    out = {}
    for name in [*orders[0].tasks, *orders[0].retention]:
        finals = [_task_rows(r.scores[name], draws.weights[name], draws.seeds)[..., -1] for r in orders]
        out[name] = np.mean(finals, axis=0).mean(-1)
    return out


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """The percentile interval of bootstrap samples; None when a sample is undefined (NaN or infinite)."""
    samples = np.asarray(samples, dtype=float)
    if samples.size == 0 or not np.all(np.isfinite(samples)):
        return None
    tail = 50.0 * (1.0 - level)
    lo, hi = np.percentile(samples, [tail, 100.0 - tail])
    return float(lo), float(hi)
