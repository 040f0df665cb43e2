"""Weight sparsity by magnitude projection (docs/method.md §2), applied to a model from outside.

After every optimizer step each sparse parameter keeps exactly k = floor(density · numel) entries of largest
|w| over the whole tensor and the rest are set to zero. Neurons are protected: every MLP neuron and every
attention q/k/v/output channel keeps its j largest entries in each matrix that touches it; those count inside k.

Tie rule (the projection, its protected entries and the radix-select kernel): among equal |w|, the entry with the lower flat (row-major) index is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from kernels.reference import projection_mask
from sparse_lm.config import SparsityConfig, check_ranges
from sparse_lm.errors import UserError
from sparse_lm.roles import role
from sparse_lm.schedule import density_at

@dataclass
class SparseParam:
    name: str
    param: nn.Parameter
    kind: str  # "hidden" | "embed" | "bias" (sparse_lm.roles)
    neuron_axis: int | None  # axis whose slices keep >= j nonzeros; None = no minimum


@dataclass(frozen=True)
class Plan:
    """The sparsity of one step, computed once and handed to the projection, the kernels and the logger."""

    step: int
    density: dict[str, float]  # per kind ("hidden", "embed", "bias")
    k: dict[str, int]  # nonzeros each sparse parameter keeps, by name


def sparse_params(model: nn.Module, cfg: SparsityConfig) -> list[SparseParam]:
    """Every weight matrix, the embeddings and unembedding, and (if sparsify_biases) the biases (sparse_lm.roles)."""
    out = []
    for name, p in model.named_parameters():
        r = role(name)
        if r.sparse(cfg.sparsify_biases):
            out.append(SparseParam(name, p, r.kind, r.neuron_axis))
    return out


class Sparsifier:
    """Holds a model's sparse parameters and projects them to the density the schedule asks for."""

    def __init__(self, model: nn.Module, cfg: SparsityConfig, total_steps: int):
        self.cfg, self.total_steps = cfg, total_steps
        self.params = sparse_params(model, cfg) if cfg.enabled else []
        # (parameter, k, j) -> mask of the entries to keep; kernels.select.RadixSelect is the fast one on CUDA.
        self.mask_fn = lambda sp, k, j: projection_mask(sp.param, k, j, sp.neuron_axis)
        self._check()

    def targets(self) -> dict[str, float]:
        c = self.cfg
        return {"hidden": c.hidden_density, "embed": c.embed_density, "bias": c.bias_density}

    def density(self, kind: str, step: int) -> float:
        """Density of parameters of `kind` after `step` optimizer steps."""
        c = self.cfg
        if not c.enabled:
            return 1.0
        return density_at(step / self.total_steps, self.targets()[kind], c.anneal_start, c.anneal_end, c.anneal)

    def plan(self, step: int) -> Plan:
        density = {kind: self.density(kind, step) for kind in self.targets()}
        return Plan(step, density, {sp.name: math.floor(density[sp.kind] * sp.param.numel()) for sp in self.params})

    def j(self, sp: SparseParam) -> int:
        return self.cfg.min_per_neuron if sp.neuron_axis is not None else 0

    @torch.no_grad()
    def apply(self, plan: Plan) -> None:
        """Project every sparse parameter to its k in `plan` (k = numel means dense: skipped)."""
        for sp in self.params:
            k = plan.k[sp.name]
            if k < sp.param.numel():
                sp.param.mul_(self.mask_fn(sp, k, self.j(sp)))

    def _check(self) -> None:
        c = self.cfg
        check_ranges(c, "sparsity.")  # each field's range lives in the schema (sparse_lm/config.py)
        if not c.anneal_start <= c.anneal_end:
            raise UserError(f"sparsity.anneal_start={c.anneal_start} and anneal_end={c.anneal_end} must satisfy 0 ≤ start ≤ end ≤ 1")
        # The j-rule must fit inside the final k of every matrix: fail now, not at the end of the anneal.
        for sp in self.params:
            if sp.neuron_axis is None:
                continue
            neurons, fan = sp.param.shape[sp.neuron_axis], sp.param.shape[1 - sp.neuron_axis]
            need = neurons * min(c.min_per_neuron, fan)
            k = math.floor(self.targets()[sp.kind] * sp.param.numel())
            if need > k:
                raise UserError(
                    f"sparsity.min_per_neuron={c.min_per_neuron} needs {need} nonzeros in {sp.name} "
                    f"{tuple(sp.param.shape)} but sparsity.{sp.kind}_density={self.targets()[sp.kind]:.6g} keeps only {k}; "
                    f"raise the density to ≥ {need / sp.param.numel():.6g} or lower min_per_neuron"
                )
