"""Rank-one subcomponents of a model's linear layers, applied from outside through forward hooks.

A decomposed `nn.Linear` with weight W [d_out, d_in] gets C subcomponents W_c = U_c V_cᵀ (U_c ∈ R^d_out,
V_c ∈ R^d_in). With a mask m ∈ [0, 1]^C per input, the layer's output is replaced by

    Σ_c m_c U_c (V_cᵀ x) + bias   =   ((x V) ⊙ m) U + bias,

so no per-input weight matrix is ever materialised: the cost is two thin matmuls. The target model itself is
frozen and unchanged; `replaced` swaps a module's output for a function of its input for the duration of a block.

For a weight-sparse target, `pattern=True` restricts every subcomponent to the target's nonzero entries,
W_c = (U_c V_cᵀ) ⊙ M, where M is 1 where W ≠ 0. Then the output works on the nonzero entries e = (o, i) only:
P[c, e] = U_co V_ic, and y_o = Σ_{e at row o} (Σ_c m_c P[c, e]) x_i: one [C, nnz] matmul per input, so a 1/16-dense
target costs 1/16 of the dense product, still without a per-input matrix.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from sparse_lm.errors import UserError


class LinearComponents(nn.Module):
    def __init__(self, target: nn.Linear, C: int, pattern: bool = False):
        super().__init__()
        d_out, d_in = target.weight.shape
        self.C, self.d_in, self.d_out = C, d_in, d_out
        self.V = nn.Parameter(torch.empty(d_in, C))
        self.U = nn.Parameter(torch.empty(C, d_out))
        self.register_buffer("pattern", (target.weight.detach() != 0).T.float() if pattern else None)  # [d_in, d_out]
        rows, cols = (target.weight.detach() != 0).nonzero(as_tuple=True) if pattern else (None, None)
        self.register_buffer("rows", rows, persistent=False)  # the nonzero entries (o, i) of the pattern
        self.register_buffer("cols", cols, persistent=False)
        self.bias = target.bias  # not decomposed; the target's own (frozen) bias
        self.reset(target.weight.detach())

    @torch.no_grad()
    def reset(self, weight: torch.Tensor) -> None:
        """Random unit directions, each U_c scaled by its overlap ⟨U_c, W V_c⟩ with the target. (The authors' code
        draws V ~ N(0, 1/d_in), U ~ N(0, 1/C) instead; on TMS 40-10 that recovered W₁ less well: docs/decompose.md.)"""
        self.V.copy_(torch.randn_like(self.V))
        self.V /= self.V.norm(dim=0, keepdim=True)
        self.U.copy_(torch.randn_like(self.U))
        self.U /= self.U.norm(dim=1, keepdim=True)
        overlap = torch.einsum("co,oi,ic->c", self.U, weight, self.V)
        self.U *= overlap[:, None]

    def weights(self) -> torch.Tensor:
        """Every subcomponent as a matrix [C, d_out, d_in] (for losses and metrics, not the forward pass)."""
        w = torch.einsum("co,ic->coi", self.U, self.V)
        return w * self.pattern.T if self.pattern is not None else w

    def weight(self) -> torch.Tensor:
        """Σ_c W_c [d_out, d_in]."""
        w = (self.V @ self.U).T
        return w * self.pattern.T if self.pattern is not None else w

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        """V_cᵀ x for every c [..., C]: the causal-importance functions' input."""
        return x @ self.V

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pattern is None:
            a = self.inner(x)
            out = (a if mask is None else a * mask) @ self.U
        else:
            P = self.U[:, self.rows] * self.V[self.cols].T  # [C, nnz]: subcomponent c's value at each nonzero entry
            coef = P.sum(0) if mask is None else mask @ P  # [..., nnz]: the masked weight at each entry, per input
            out = x.new_zeros(*x.shape[:-1], self.d_out).index_add_(-1, self.rows, coef * x[..., self.cols])
        return out if self.bias is None else out + self.bias


@contextmanager
def replaced(model: nn.Module, fns: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Inside the block, module `name`'s output is fns[name](its input)."""
    handles = [model.get_submodule(name).register_forward_hook(lambda _m, inp, _out, fn=fn: fn(inp[0]))
               for name, fn in fns.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_target(model: nn.Module, output, names: list[str], x) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(output(model, x), each named module's input) from one clean pass; `output` picks what the losses compare."""
    inputs: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda _m, inp, n=n: inputs.__setitem__(n, inp[0]))
               for n in names]
    try:
        with torch.no_grad():
            out = output(model, x)
    finally:
        for h in handles:
            h.remove()
    return out, inputs


def linear_modules(model: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    """The named modules, after checking each exists and is an nn.Linear (the error names the bad one)."""
    out = {}
    available = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for n in names:
        try:
            m = model.get_submodule(n)
        except AttributeError:
            raise UserError(f"modules: {n!r} is not a module of the target; its linear layers are {available}") from None
        if not isinstance(m, nn.Linear):
            raise UserError(f"modules: {n!r} is a {type(m).__name__}, not an nn.Linear; the linear layers are {available}")
        out[n] = m
    return out
