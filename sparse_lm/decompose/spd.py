"""Stochastic Parameter Decomposition (Bushnaq et al. 2025; docs/decompose.md §SPD).

Every decomposed matrix gets C rank-one subcomponents (components.py) and, per subcomponent, a small MLP that
maps the subcomponent's inner activation V_cᵀx to a causal importance g_c(x) ∈ [0, 1]. Training asks that

- the subcomponents sum to the target's weights (faithfulness),
- the target's output is reproduced when every subcomponent is scaled by a random mask m_c = g_c + (1 − g_c)·r,
  r ~ U(0, 1), all matrices at once (stochastic reconstruction) and one matrix at a time (layerwise),
- as few subcomponents as possible matter on each input: Σ_c mean_x g_c(x)^p (importance minimality).

So a subcomponent with g_c(x) = 0 can be ablated anywhere between 0 and 1 without changing the output on x.
With `delta=True` (as in the authors' current TMS configurations) faithfulness is not a loss term: the residual
W − Σ_c U_c V_cᵀ enters every masked pass as one more piece under a uniform random mask, so the reconstruction
losses themselves push it to zero, in proportion to how much it changes the output.
The masks use the lower-leaky hard sigmoid (clamped to [0, 1], a small gradient below 0 so a dead g can revive);
the minimality loss the upper-leaky one (a small slope above 1, so it keeps pushing).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparse_lm.decompose.components import LinearComponents, linear_modules, replaced, run_target


class _LowerLeakyHardSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha):
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return x.clamp(0, 1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        # Below 0 only a push upward passes (scaled by alpha); above 1 nothing passes.
        below = torch.where(grad < 0, ctx.alpha * grad, torch.zeros_like(grad))  # grad < 0: the loss wants x larger
        return torch.where(x <= 0, below, torch.where(x <= 1, grad, torch.zeros_like(grad))), None


def lower_leaky_hard_sigmoid(x: torch.Tensor, alpha: float = 0.01) -> torch.Tensor:
    return _LowerLeakyHardSigmoid.apply(x, alpha)


def upper_leaky_hard_sigmoid(x: torch.Tensor, alpha: float = 0.01) -> torch.Tensor:
    return torch.where(x > 1, 1 + alpha * (x - 1), x.clamp(0, 1))


class CIFunctions(nn.Module):
    """C independent scalar MLPs 1 → hidden (GELU) → 1: g_c's pre-activation from V_cᵀx."""

    def __init__(self, C: int, hidden: int = 16):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(C, hidden) * (2.0**0.5))  # fan-in 1, He initialisation
        self.b1 = nn.Parameter(torch.zeros(C, hidden))
        self.w2 = nn.Parameter(torch.randn(C, hidden) / hidden**0.5)
        self.b2 = nn.Parameter(torch.zeros(C))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        # As batched matmuls over c (a [N, C] → [C, N, hidden] → [C, N]): about twice as fast on a CPU as the
        # broadcast-multiply-and-sum it computes, gelu(a_c w1_c + b1_c) · w2_c + b2_c.
        lead = a.shape[:-1]
        a = a.reshape(-1, self.b2.shape[0]).T[:, :, None]
        h = F.gelu(torch.baddbmm(self.b1[:, None, :], a, self.w1[:, None, :]))
        out = torch.bmm(h, self.w2[:, :, None])[..., 0] + self.b2[:, None]
        return out.T.reshape(*lead, -1)


def key(name: str) -> str:
    return name.replace(".", "/")  # ModuleDict keys cannot hold dots


def output_loss(out: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """mse: mean squared error over every output; kl: KL(target ‖ out) of the softmax over the last axis, mean per position."""
    if kind == "mse":
        return F.mse_loss(out, target)
    return F.kl_div(F.log_softmax(out, -1), F.log_softmax(target, -1), log_target=True, reduction="none").sum(-1).mean()


class SPD(nn.Module):
    """The decomposition of `names` (nn.Linear modules of `target`). The target is held, frozen, outside the
    state dict: a checkpoint of the decomposition holds only the subcomponents and CI functions."""

    def __init__(self, target: nn.Module, names: list[str], C: int, ci_hidden: int = 16, pattern: bool = False,
                 output: Callable = lambda model, x: model(x), delta: bool = False):
        super().__init__()
        self.__dict__["target"] = target.eval().requires_grad_(False)
        self.names, self.output, self.C, self.delta = list(names), output, C, delta
        mods = linear_modules(target, self.names)
        self.components = nn.ModuleDict({key(n): LinearComponents(m, C, pattern) for n, m in mods.items()})
        self.ci = nn.ModuleDict({key(n): CIFunctions(C, ci_hidden) for n in self.names})

    def comp(self, name: str) -> LinearComponents:
        return self.components[key(name)]

    def target_weight(self, name: str) -> torch.Tensor:
        return self.target.get_submodule(name).weight

    def component_weights(self, name: str) -> torch.Tensor:
        """[C, d_out, d_in] (as APD.component_weights)."""
        return self.comp(name).weights()

    def run_target(self, x):
        return run_target(self.target, self.output, self.names, x)

    def importances(self, inputs: dict[str, torch.Tensor], alpha: float = 0.01) -> tuple[dict, dict]:
        """(g for masks: lower-leaky, g for minimality: upper-leaky) per matrix, each [..., C]."""
        pre = {n: self.ci[key(n)](self.comp(n).inner(inputs[n])) for n in self.names}
        return ({n: lower_leaky_hard_sigmoid(p, alpha) for n, p in pre.items()},
                {n: upper_leaky_hard_sigmoid(p, alpha) for n, p in pre.items()})

    def residual(self, name: str) -> torch.Tensor:
        """W − Σ_c W_c [d_out, d_in]: what the subcomponents miss of the target's matrix."""
        return self.target_weight(name) - self.comp(name).weight()

    def masked(self, masks: dict[str, torch.Tensor | None], delta_masks: dict[str, torch.Tensor] | None = None):
        """Inside the block, each matrix named in `masks` ([..., C] or [C] each) is replaced by its masked
        subcomponents; others are untouched. With `delta_masks` ([...] per matrix), the residual enters each replaced
        matrix scaled by its mask."""
        def fn(n, m, d):
            if d is None:
                return lambda inp: self.comp(n)(inp, m)
            return lambda inp: self.comp(n)(inp, m) + d[..., None] * (inp @ self.residual(n).T)
        return replaced(self.target, {n: fn(n, m, (delta_masks or {}).get(n)) for n, m in masks.items()})

    def forward_masked(self, x, masks: dict[str, torch.Tensor | None],
                       delta_masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The target's output under `masked`."""
        with self.masked(masks, delta_masks):
            return self.output(self.target, x)

    def faithfulness(self) -> torch.Tensor:
        sq = sum((self.residual(n) ** 2).sum() for n in self.names)
        return sq / sum(self.target_weight(n).numel() for n in self.names)

    def losses(self, x, p: float = 2.0, eps: float = 1e-12, output_kind: str = "mse", n_mask_samples: int = 1,
               alpha: float = 0.01, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        target_out, inputs = self.run_target(x)
        g_mask, g_min = self.importances(inputs, alpha)
        recon, layerwise = 0.0, 0.0
        for _ in range(n_mask_samples):
            masks = {n: stochastic_mask(g, torch.rand(g.shape, generator=generator, device=g.device)) for n, g in g_mask.items()}
            deltas = ({n: torch.rand(g.shape[:-1], generator=generator, device=g.device) for n, g in g_mask.items()}
                      if self.delta else {})
            recon = recon + output_loss(self.forward_masked(x, masks, deltas), target_out, output_kind)
            layerwise = layerwise + sum(output_loss(self.forward_masked(x, {n: masks[n]}, deltas), target_out, output_kind)
                                        for n in self.names) / len(self.names)
        return {"faithfulness": self.faithfulness(), "stochastic_recon": recon / n_mask_samples,
                "stochastic_recon_layerwise": layerwise / n_mask_samples,
                "importance_minimality": importance_minimality(g_min.values(), p, eps)}


def stochastic_mask(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """m = g + (1 − g)·r: a subcomponent of importance 1 is kept whole, one of importance 0 scaled anywhere in [0, 1]."""
    return g + (1 - g) * r


def importance_minimality(gs, p: float, eps: float = 1e-12) -> torch.Tensor:
    """Σ over matrices and subcomponents of mean_x (g_c(x) + eps)^p."""
    return sum((g + eps).pow(p).reshape(-1, g.shape[-1]).mean(0).sum() for g in gs)

