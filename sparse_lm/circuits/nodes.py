"""The node space: one node per channel of each prunable activation site, in forward order.

Per layer: the attention's read of the residual (`attn.in`), its q, k and v channels, its write to the residual
(`attn.out`), the MLP's read (`mlp.in`), its neurons (`mlp.neuron`) and its write (`mlp.out`). A flat vector
over all nodes (a mask, a score) splits into one tensor per site.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sparse_lm.hooks import blend, patch, record
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

    def offset(self, site: str) -> int:
        """Where `site`'s channels start in the flat vector over all nodes."""
        return sum(self.dims[: self.sites.index(site)])

    def flat(self, kept: dict[str, list[int]]) -> torch.Tensor:
        """The 0/1 vector over all nodes with the channels of `kept` (site -> indices) set: `kept`'s inverse."""
        parts = []
        for site, dim in zip(self.sites, self.dims):
            part = torch.zeros(dim)
            part[kept.get(site, [])] = 1.0
            parts.append(part)
        return torch.cat(parts)

    def kept(self, keep: torch.Tensor) -> dict[str, list[int]]:
        """Channel indices kept at each site (sites with none are left out)."""
        out = {}
        for site, k in self.split(keep).items():
            idx = (k > 0.5).nonzero().flatten().tolist()
            if idx:
                out[site] = idx
        return out


@dataclass
class Ablation:
    """What a pruned node becomes (PruneConfig.ablation) and whether norms are frozen (PruneConfig.frozen_norms).

    mean: its mean over pretraining data (`means`); zero: 0; resample: its value at the same position in another
    pretraining context (rows of `source` [n, T] token ids, drawn with `seed`). With `frozen_norms`, every norm of
    the pruned forward divides by the scale the unpruned model computes on the same input, so pruning cannot
    shrink a norm's denominator and amplify what is left.
    """

    mode: str = "mean"
    means: dict[str, torch.Tensor] | None = None
    source: torch.Tensor | None = None
    frozen_norms: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.mode == "mean" and self.means is None:
            raise ValueError("mean ablation needs the site means")
        if self.mode == "resample" and self.source is None:
            raise ValueError("resample ablation needs pretraining token ids to resample from")


def norm_scale(norm: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre, 1 / scale) of x as `norm` (RMSNorm or LayerNorm) computes them, per position."""
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    if isinstance(norm, torch.nn.LayerNorm):
        centre = x.mean(-1, keepdim=True)
        return centre, torch.rsqrt((x - centre).pow(2).mean(-1, keepdim=True) + eps)
    return torch.zeros_like(x[..., :1]), torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@contextmanager
def ablated(model: GPT, space: NodeSpace, keep: torch.Tensor, how: Ablation):
    """Forward passes inside the block see every node with keep = 0 ablated as `how` says.

    `keep` may be soft or carry gradients (straight-through masks): each site computes keep·x + (1 − keep)·r, with
    r the replacement. Resampling and frozen norms need a clean forward pass before each pruned one (on other
    contexts, or on the same input); a pre-hook on the model runs it, without gradients.
    """
    device = model.lm_head.weight.device
    keeps = space.split(keep.to(device))
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.RMSNorm, torch.nn.LayerNorm))]
    gen = torch.Generator().manual_seed(how.seed)
    state: dict = {"clean": False}

    def replacement(site: str, x: torch.Tensor) -> torch.Tensor:
        if how.mode == "zero":
            return torch.zeros((), dtype=x.dtype, device=device)
        if how.mode == "resample":
            return state["resampled"][site]
        return how.means[site].to(device)

    def site_fn(site: str):
        return lambda x: x if state["clean"] else blend(x, keeps[site], replacement(site, x))

    def before(_module, args, kwargs):
        if state["clean"] or (how.mode != "resample" and not how.frozen_norms):
            return
        idx = args[0] if args else kwargs["idx"]
        rest = {k: v for k, v in kwargs.items() if k == "last"}
        state["clean"] = True
        try:
            with torch.no_grad():
                if how.frozen_norms:
                    scales = {}
                    hooks = [n.register_forward_hook(lambda m, inp, _out: scales.__setitem__(m, norm_scale(m, inp[0]))) for n in norms]
                    try:
                        model(idx, **rest)
                    finally:
                        for h in hooks:
                            h.remove()
                    state["scales"] = scales
                if how.mode == "resample":
                    rows = torch.randint(how.source.shape[0], (idx.shape[0],), generator=gen)
                    with record(model, space.sites) as acts:
                        model(how.source[rows, : idx.shape[1]].to(device))
                    state["resampled"] = acts
        finally:
            state["clean"] = False

    def frozen(norm, inp, out):
        if state["clean"] or not how.frozen_norms:
            return out
        centre, inv = state["scales"][norm]
        y = (inp[0] - centre) * inv
        y = y * norm.weight if norm.weight is not None else y
        return y + norm.bias if getattr(norm, "bias", None) is not None else y

    handles = [model.register_forward_pre_hook(before, with_kwargs=True)]
    handles += [n.register_forward_hook(frozen) for n in norms] if how.frozen_norms else []
    try:
        with patch(model, {site: site_fn(site) for site in space.sites}):
            yield
    finally:
        for h in handles:
            h.remove()
