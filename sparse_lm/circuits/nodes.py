"""The node space: one node per channel of each prunable activation site, in forward order.

Per layer: the attention's read of the residual (`attn.in`), its q, k and v channels, its write to the residual
(`attn.out`), the MLP's read (`mlp.in`), its neurons (`mlp.neuron`) and its write (`mlp.out`). A flat vector
over all nodes (a mask, a score) splits into one tensor per site.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sparse_lm.hooks import blend, patch
from sparse_lm.model import GPT
from sparse_lm.roles import SITES



@dataclass
class NodeSpace:
    sites: list[str]  # e.g. "2.mlp.neuron"
    dims: list[int]

    @classmethod
    def of(cls, model: GPT) -> NodeSpace:
        """Every channel of the model's sites of kind sparse_lm.roles.SITES (the residual stream has no nodes)."""
        sites = [site for site in model.sites.values() if site.kind in SITES]
        return cls([site.name for site in sites], [site.dim for site in sites])

    @property
    def total(self) -> int:
        return sum(self.dims)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.sites, torch.split(flat, self.dims)))

    def kept(self, keep: torch.Tensor) -> dict[str, list[int]]:
        """Channel indices kept at each site (sites with none are left out)."""
        out = {}
        for site, k in self.split(keep).items():
            idx = (k > 0.5).nonzero().flatten().tolist()
            if idx:
                out[site] = idx
        return out


@contextmanager
def ablated(model: GPT, space: NodeSpace, keep: torch.Tensor, means: dict[str, torch.Tensor]):
    """Forward passes inside the block see every node with keep = 0 replaced by its mean (mean ablation).

    `keep` may be soft or carry gradients (straight-through masks): each site computes keep·x + (1 − keep)·mean.
    """
    device = model.lm_head.weight.device
    keeps = space.split(keep.to(device))
    fns = {site: (lambda x, k=keeps[site], m=means[site].to(device): blend(x, k, m)) for site in space.sites}
    with patch(model, fns):
        yield
