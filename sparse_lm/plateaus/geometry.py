"""Where perturbations start and where they go: activation statistics, covariance-matched samples, and paths.

Random activations and directions are drawn with the real activations' mean and covariance (a random direction drawn
isotropically is a misleading baseline: real activations live in a few directions, and the model is insensitive to
most others). The covariance is a Ledoit–Wolf shrinkage estimate, so it stays well conditioned with fewer samples
than dimensions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def shrinkage_covariance(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ledoit–Wolf estimate of the covariance of the rows of x [n, d]: (1 − λ)·S + λ·(tr S / d)·I, and λ.

    λ is the closed form of Ledoit & Wolf (2004), clipped to [0, 1]."""
    n, d = x.shape
    xc = x - x.mean(0)
    s = xc.T @ xc / n
    mu = torch.trace(s) / d
    delta2 = ((s - mu * torch.eye(d, dtype=x.dtype)) ** 2).sum() / d
    # Σ_k ‖x_k x_kᵀ − S‖² / (n² d), written as (Σ_k ‖x_k‖⁴ − n ‖S‖²) / (n² d) to stay O(n d + d²) in memory
    beta2 = ((xc.pow(2).sum(1) ** 2).sum() - n * (s**2).sum()) / (n * n * d)
    lam = float(min(max(beta2 / delta2, 0.0), 1.0)) if delta2 > 0 else 1.0
    return (1 - lam) * s + lam * mu * torch.eye(d, dtype=x.dtype), lam


@dataclass
class Stats:
    """Mean and (shrunk) covariance of the real activations at a site."""

    mean: torch.Tensor  # [d]
    cov: torch.Tensor  # [d, d]
    shrinkage: float

    @classmethod
    def of(cls, x: torch.Tensor) -> "Stats":
        x = x.double()
        cov, lam = shrinkage_covariance(x)
        return cls(x.mean(0), cov, lam)

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """n covariance-matched random activations: N(mean, cov)."""
        chol = torch.linalg.cholesky(self.cov)
        z = torch.randn(n, self.mean.numel(), generator=gen, dtype=torch.float64)
        return self.mean + z @ chol.T

    def isotropic(self, n: int, radius: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """n points mean + radius·u, u uniform on the unit sphere (radius [n]): the isotropic baseline."""
        u = torch.randn(n, self.mean.numel(), generator=gen, dtype=torch.float64)
        return self.mean + radius[:, None] * u / u.norm(dim=1, keepdim=True)


def straight(base: torch.Tensor, target: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """base + α (target − base) for every α: [n, k, d] from bases and targets [n, d] and alphas [k]."""
    return base[:, None] + alphas[None, :, None] * (target - base)[:, None]


def sphere(base: torch.Tensor, target: torch.Tensor, centre: torch.Tensor, fractions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate base about `centre` toward target, keeping ‖x − centre‖ = ‖base − centre‖: the points at each fraction of
    the angle between (base − centre) and (target − centre), and those angles in degrees [n, k]."""
    a, b = base - centre, target - centre
    r = a.norm(dim=1, keepdim=True)
    u = a / r
    w = b - (b * u).sum(1, keepdim=True) * u
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
    theta = torch.atan2((b * w).sum(1), (b * u).sum(1))  # the angle to the target, in [0, π]
    angles = theta[:, None] * fractions[None, :]
    c = centre if centre.dim() == 1 else centre[:, None]  # one centre, or one per path
    points = c + r[:, None] * (torch.cos(angles)[..., None] * u[:, None] + torch.sin(angles)[..., None] * w[:, None])
    return points, angles * 180 / math.pi
