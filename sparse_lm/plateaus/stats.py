"""Summaries of perturbation curves: where a curve first crosses a level, how sharply, intervals and a rank test."""

from __future__ import annotations

import math

import torch


def crossing(x: torch.Tensor, y: torch.Tensor, level: float) -> float | None:
    """The first x at which y reaches `level`, linear between grid points (None: it never does). x ascending."""
    above = (y >= level).nonzero()
    if above.numel() == 0:
        return None
    j = int(above[0])
    if j == 0:
        return float(x[0])
    x0, x1, y0, y1 = float(x[j - 1]), float(x[j]), float(y[j - 1]), float(y[j])
    return x0 + (x1 - x0) * (level - y0) / (y1 - y0)


def bootstrap_mean(values: list[float], n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile of the bootstrap means)."""
    v = torch.tensor(values, dtype=torch.float64)
    if v.numel() == 0:
        return math.nan, math.nan, math.nan
    idx = torch.randint(v.numel(), (n, v.numel()), generator=torch.Generator().manual_seed(seed))
    means = v[idx].mean(1)
    return float(v.mean()), float(means.quantile(0.025)), float(means.quantile(0.975))


def rank_test(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mann–Whitney U test of a against b: (the probability that a value of a exceeds one of b, ties counting half;
    two-sided p from the normal approximation with the tie correction)."""
    n1, n2 = len(a), len(b)
    if not n1 or not n2:
        return math.nan, math.nan
    both = torch.tensor(list(a) + list(b), dtype=torch.float64)
    order = both.argsort()
    ranks = torch.empty_like(both)
    values = both[order]
    i = 0
    while i < len(values):  # average ranks over ties
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = float(ranks[:n1].sum()) - n1 * (n1 + 1) / 2
    _, counts = values.unique(return_counts=True)
    n = n1 + n2
    var = n1 * n2 / 12 * ((n + 1) - float((counts**3 - counts).sum()) / (n * (n - 1)))
    z = (u - n1 * n2 / 2) / math.sqrt(var) if var > 0 else 0.0
    return u / (n1 * n2), math.erfc(abs(z) / math.sqrt(2))


def bootstrap_difference(a: list[float], b: list[float], n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """mean(b) − mean(a), with the 2.5th and 97.5th percentiles of its bootstrap (each sample resampled on its own)."""
    if not a or not b:
        return math.nan, math.nan, math.nan
    g = torch.Generator().manual_seed(seed)
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    da = ta[torch.randint(len(a), (n, len(a)), generator=g)].mean(1)
    db = tb[torch.randint(len(b), (n, len(b)), generator=g)].mean(1)
    diffs = db - da
    return float(tb.mean() - ta.mean()), float(diffs.quantile(0.025)), float(diffs.quantile(0.975))
