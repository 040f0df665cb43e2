"""Attribution-based Parameter Decomposition (Braun et al. 2025; docs/decompose.md §APD).

The decomposed matrices' parameters are written as a sum of C components, P_c (one matrix per decomposed layer,
factored as A_c B_c with inner width m so that its rank can fall). On each input, the components with the largest
gradient attributions

    attr_c(x) = mean_o ( Σ_l Σ_ij ∂y_o/∂W^l_ij · P^l_c,ij )²        (y: the target's output)

are kept by a batch top-k (the k·B largest of the [B, C] attributions, so an input may use more or fewer than k).
Training asks that the components sum to the parameters (faithfulness), that the kept ones alone reproduce the
output (minimality), and that each is low-rank (simplicity: the Schatten-p quasi-norm, p < 1, of the kept ones).

The inner sum is the derivative of y along the direction P_c in parameter space: one forward-mode JVP per
component gives it exactly (`attributions_jvp`); `attributions_backward` computes the same by one backward pass
per output, and exists to check it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, jvp, vmap

from sparse_lm.decompose.components import linear_modules, replaced, run_target
from sparse_lm.decompose.spd import key, output_loss


class APD(nn.Module):
    def __init__(self, target: nn.Module, names: list[str], C: int, m: int | None = None,
                 output: Callable = lambda model, x: model(x)):
        super().__init__()
        self.__dict__["target"] = target.eval().requires_grad_(False)
        self.names, self.output, self.C = list(names), output, C
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for n, mod in linear_modules(target, self.names).items():
            d_out, d_in = mod.weight.shape
            width = m or min(d_in, d_out)
            self.A[key(n)] = nn.Parameter(torch.randn(C, d_in, width) / d_in**0.5)
            self.B[key(n)] = nn.Parameter(torch.randn(C, width, d_out) / width**0.5 / C**0.5)

    def component_weights(self, name: str) -> torch.Tensor:
        """[C, d_out, d_in]."""
        return torch.einsum("cim,cmo->coi", self.A[key(name)], self.B[key(name)])

    def target_weight(self, name: str) -> torch.Tensor:
        return self.target.get_submodule(name).weight

    def run_target(self, x):
        return run_target(self.target, self.output, self.names, x)

    # --- attributions -------------------------------------------------------------------------------------------
    def attributions_jvp(self, x) -> torch.Tensor:
        """[..., C]: the squared directional derivative of the output along each component, averaged over outputs."""
        primals = {f"{n}.weight": self.target_weight(n).detach() for n in self.names}
        tangents = {f"{n}.weight": self.component_weights(n).detach() for n in self.names}  # each [C, d_out, d_in]

        def f(weights):
            return self.output(_Params(self.target, weights), x)

        def along(t):
            return jvp(f, (primals,), (t,))[1]

        d = vmap(along)(tangents)  # [C, ..., d_y]
        return d.pow(2).mean(-1).movedim(0, -1)

    def attributions_backward(self, x) -> torch.Tensor:
        """The same as attributions_jvp, by one backward pass per output: ∂y_o/∂W^l = g_l ⊗ x_l, so the sum over W^l
        against P_c is g_l · (P_c x_l), with g_l = ∂y_o/∂(layer l's output) (per example: examples are independent)."""
        outs: dict[str, torch.Tensor] = {}
        ins: dict[str, torch.Tensor] = {}

        def keep(n):
            def hook(_m, inp, out):
                ins[n] = inp[0].detach()
                if not out.requires_grad:  # the first decomposed layer: start the graph here
                    out = out.detach().requires_grad_(True)
                outs[n] = out  # a later layer's output stays in the graph, so earlier ones get their total derivative
                return out
            return hook

        handles = [self.target.get_submodule(n).register_forward_hook(keep(n)) for n in self.names]
        try:
            y = self.output(self.target, x)
        finally:
            for h in handles:
                h.remove()
        P = {n: self.component_weights(n).detach() for n in self.names}
        Px = {n: torch.einsum("coi,...i->...co", P[n], ins[n]) for n in self.names}
        total = 0.0
        for o in range(y.shape[-1]):
            grads = torch.autograd.grad(y[..., o].sum(), [outs[n] for n in self.names], retain_graph=True, allow_unused=True)
            d = sum(torch.einsum("...k,...ck->...c", g, Px[n]) for n, g in zip(self.names, grads) if g is not None)
            total = total + d.pow(2)
        return total / y.shape[-1]

    # --- the three losses ---------------------------------------------------------------------------------------
    def faithfulness(self) -> torch.Tensor:
        sq = sum(((self.target_weight(n) - self.component_weights(n).sum(0)) ** 2).sum() for n in self.names)
        return sq / sum(self.target_weight(n).numel() for n in self.names)

    def forward_masked(self, x, mask: torch.Tensor) -> torch.Tensor:
        """The output with each decomposed layer computing Σ_c mask_c P_c x (+ its bias); mask [..., C]."""
        def layer(n):
            bias = self.target.get_submodule(n).bias

            def fn(inp):
                h = torch.einsum("...i,cim->...cm", inp, self.A[key(n)])
                out = torch.einsum("...cm,cmo,...c->...o", h, self.B[key(n)], mask)
                return out if bias is None else out + bias
            return fn

        with replaced(self.target, {n: layer(n) for n in self.names}):
            return self.output(self.target, x)

    def simplicity(self, mask: torch.Tensor, p: float = 0.9, eps: float = 1e-12) -> torch.Tensor:
        """Σ_l Σ_c (fraction of inputs that kept c) · Σ_k (‖A_c[:, k]‖² ‖B_c[k, :]‖²)^(p/2): the Schatten-p of each
        kept component, through its factors (exact for orthogonal factors, an upper bound otherwise), divided by
        the number of decomposed weights as faithfulness is (so the published coefficients carry over)."""
        use = mask.reshape(-1, mask.shape[-1]).float().mean(0)  # [C]
        total = 0.0
        for n in self.names:
            a2 = self.A[key(n)].pow(2).sum(1)  # [C, m]
            b2 = self.B[key(n)].pow(2).sum(2)  # [C, m]
            total = total + (use * (a2 * b2 + eps).pow(p / 2).sum(-1)).sum()
        return total / sum(self.target_weight(n).numel() for n in self.names)

    def losses(self, x, topk: float = 1.0, p: float = 0.9, output_kind: str = "mse") -> tuple[dict, torch.Tensor]:
        target_out, _ = self.run_target(x)
        mask = batch_topk(self.attributions_jvp(x), topk)
        out = self.forward_masked(x, mask.float())
        return ({"faithfulness": self.faithfulness(), "minimality": output_loss(out, target_out, output_kind),
                 "simplicity": self.simplicity(mask, p)}, mask)


def batch_topk(attr: torch.Tensor, k: float) -> torch.Tensor:
    """Boolean [..., C]: the round(k · n_inputs) largest attributions over the whole batch (ties: the first ones)."""
    flat = attr.reshape(-1)
    n_inputs = attr.reshape(-1, attr.shape[-1]).shape[0]
    count = max(1, min(flat.numel(), round(k * n_inputs)))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(count).indices] = True
    return keep.reshape(attr.shape)


class _Params(nn.Module):
    """The target with some weights swapped for given tensors (torch.func.functional_call), as a callable module."""

    def __init__(self, model, weights):
        super().__init__()
        self.__dict__["model"], self.__dict__["weights"] = model, weights

    def __call__(self, x):
        return functional_call(self.model, self.weights, (x,), strict=False)
