"""The plateau protocol on one model: bases × directions × paths, their curves, and their summaries.

Bases: real activations at the site (last position of short validation contexts), and covariance-matched random ones.
Targets (the direction is target − base):
  real_other   another prompt's real activation
  cov_random   a covariance-matched random activation
  isotropic    mean + a uniformly random direction, at the distance from the mean a cov_random target has
  mix_real     base + (real_j − real_k): a direction between two real activations, the base not entering it
  mix_cov      base + (c_1 − c_2), two covariance-matched ones
Paths: straight (x-axis α ∈ [0, 1]) and sphere (‖x − mean‖ kept, x-axis the angle in degrees). A curve's threshold is
where KL(p(start) ‖ p(point)) first reaches a level; a curve that never does is censored (counted, and treated as
later than every crossing in the rank test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sparse_lm.plateaus.geometry import Stats, sphere, straight
from sparse_lm.plateaus.measure import activations, along
from sparse_lm.plateaus.stats import bootstrap_difference, bootstrap_mean, crossing, rank_test

BASES = ("real", "random")
DIRECTIONS = ("real_other", "cov_random", "isotropic", "mix_real", "mix_cov")
PATHS = ("straight", "sphere")


@dataclass
class Summary:
    base: str
    direction: str
    path: str
    x: str  # "alpha" or "degrees"
    thresholds: dict[str, list[float | None]]  # level -> each curve's crossing (None: never)
    mean: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # level -> (mean, low, high) over crossings
    crossed: dict[str, float] = field(default_factory=dict)  # level -> fraction of curves that cross
    width: float | None = None  # median of (crossing at the highest level − at the lowest): smaller is sharper
    curve_x: list[float] = field(default_factory=list)  # the median curve, for the pictures
    curve_kl: list[list[float]] = field(default_factory=list)  # 25th, 50th, 75th percentile of KL at each x

    def hits(self, level: str) -> list[float]:
        """The thresholds of the curves that cross `level`."""
        return [v for v in self.thresholds[level] if v is not None]


def targets(kind: str, bases: torch.Tensor, real: torch.Tensor, stats: Stats, gen: torch.Generator) -> torch.Tensor:
    n = bases.shape[0]
    pick = lambda: torch.randint(real.shape[0], (n,), generator=gen)  # noqa: E731
    if kind == "real_other":
        i = torch.arange(n)
        j = (i + 1 + torch.randint(real.shape[0] - 1, (n,), generator=gen)) % real.shape[0]  # never the base's own prompt
        return real[j]
    if kind == "cov_random":
        return stats.sample(n, gen)
    if kind == "isotropic":
        return stats.isotropic(n, (stats.sample(n, gen) - stats.mean).norm(dim=1), gen)
    if kind == "mix_real":
        return bases + real[pick()] - real[pick()]
    if kind == "mix_cov":
        return bases + stats.sample(n, gen) - stats.sample(n, gen)
    raise ValueError(kind)


def summarize(base: str, direction: str, path: str, xs: torch.Tensor, kl: torch.Tensor, levels: list[float], boot: int, seed: int) -> Summary:
    """xs, kl: [n, k] (each curve's own x values)."""
    s = Summary(base, direction, path, "alpha" if path == "straight" else "degrees", {})
    for level in levels:
        at = [crossing(xs[i], kl[i], level) for i in range(kl.shape[0])]
        s.thresholds[str(level)] = at
        s.mean[str(level)] = bootstrap_mean(s.hits(str(level)), boot, seed)
        s.crossed[str(level)] = len(s.hits(str(level))) / len(at)
    lo, hi = s.thresholds[str(min(levels))], s.thresholds[str(max(levels))]
    widths = sorted(b - a for a, b in zip(lo, hi) if a is not None and b is not None)
    s.width = widths[len(widths) // 2] if widths else None
    grid = xs.contiguous().median(0).values  # (median over an expanded tensor returns garbage in torch 2.13)
    s.curve_x = grid.tolist()
    s.curve_kl = [kl.quantile(q, dim=0).tolist() for q in (0.25, 0.5, 0.75)]
    return s


@dataclass
class ModelResult:
    label: str
    site: str
    readout: str
    shrinkage: float
    summaries: list[Summary]
    gap: dict[str, tuple[float, float, float]]  # level -> mean threshold of cov_random − of real_other (real bases,
    # sphere path, crossings only), with a bootstrap interval: how much earlier real-other directions cross
    rank: dict[str, tuple[float, float]]  # level -> (P(cov_random later than real_other), p) on the same curves
    # level -> mean threshold of cov_random directions from real bases − from random bases (sphere path), with an
    # interval: how much later a real activation's output starts to move (its plateau)
    plateau: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self, base: str, direction: str, path: str) -> Summary:
        return next(s for s in self.summaries if (s.base, s.direction, s.path) == (base, direction, path))


def later(values: list[float | None]) -> list[float]:
    return [math.inf if v is None else v for v in values]


def run_model(label: str, model, site: str, readout: str, prompts: torch.Tensor, n_bases: int, steps: int, levels: list[float],
              boot: int, seed: int) -> ModelResult:
    import time

    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    real = activations(model, site, prompts)
    stats = Stats.of(real)
    fractions = torch.linspace(0, 1, steps, dtype=torch.float64)
    n = min(n_bases, real.shape[0])
    bases = {"real": real[:n], "random": stats.sample(n, gen)}
    summaries = []
    for base_kind, base in bases.items():
        for direction in DIRECTIONS:
            target = targets(direction, base, real, stats, gen)
            for path in PATHS:
                if path == "straight":
                    points, xs = straight(base, target, fractions), fractions.expand(n, -1)
                else:
                    points, xs = sphere(base, target, stats.mean, fractions)
                curves = along(model, site, readout, prompts[:n], points)
                summaries.append(summarize(base_kind, direction, path, xs, curves.kl, levels, boot, seed))
    res = ModelResult(label, site, readout, stats.shrinkage, summaries, {}, {})
    for level in map(str, levels):
        ro, cr = res.summary("real", "real_other", "sphere"), res.summary("real", "cov_random", "sphere")
        res.gap[level] = bootstrap_difference(ro.hits(level), cr.hits(level), boot, seed)
        res.rank[level] = rank_test(later(cr.thresholds[level]), later(ro.thresholds[level]))
        res.plateau[level] = bootstrap_difference(res.summary("random", "cov_random", "sphere").hits(level), cr.hits(level), boot, seed)
    res.seconds = round(time.time() - t0, 1)
    return res
