"""Density annealing and the "sharkfin" learning rate (docs/method.md §2), as functions of training progress t in [0, 1].

The trainer evaluates both at t = n / max_steps, where n is the number of optimizer steps completed once the
current step is taken: the lr of the step that brings the run to n, and the density projected after it.
"""

from __future__ import annotations

import math

from sparse_lm.config import Anneal


def anneal_fraction(t: float, start: float, end: float) -> float:
    """0 before `start`, 1 after `end`, linear in between."""
    if t <= start:
        return 0.0
    if t >= end:
        return 1.0
    return (t - start) / (end - start)


def density_at(t: float, target: float, start: float, end: float, anneal: Anneal = Anneal.linear) -> float:
    """Density annealed from 1 (dense) to `target`: linearly in density, or geometrically (exp)."""
    f = anneal_fraction(t, start, end)
    if anneal == Anneal.exp:
        return target**f
    return 1.0 + (target - 1.0) * f


def lr_multiplier(t: float, warmup: float, density: float, final_density: float) -> float:
    """Linear warmup then linear decay to 0, times sqrt(final density / current density) (≤ 1).

    The square-root factor keeps the step small while the matrices are still dense and many weights compete.
    """
    shape = t / warmup if t < warmup else max(0.0, (1.0 - t) / (1.0 - warmup))
    return shape * math.sqrt(final_density / density)
