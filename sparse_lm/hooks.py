"""One mechanism to read, replace or ablate any named activation site (docs/method.md §1).

Sites are `sparse_lm.model.Site` modules named like `3.attn.q`, `3.mlp.neuron` or `3.resid_mid`
(see `GPT.sites`). Everything here is a context manager that installs forward hooks and removes them on exit:

    with record(model, ["2.mlp.neuron"]) as acts:
        model(idx)
    acts["2.mlp.neuron"]                       # [B, T, d_mlp]

    with mean_ablate(model, {"2.mlp.neuron": (mask, means)}):
        model(idx)                             # channels where mask is True read their mean instead

Pruning and the analysis tools build on `patch`, which takes any function of the activation.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch

Patch = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def patch(model, fns: dict[str, Patch]) -> Iterator[None]:
    """Replace the value at each named site by fn(value) during the forward passes inside the block."""
    handles = [model.site(name).register_forward_hook(lambda _m, _i, out, fn=fn: fn(out)) for name, fn in fns.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record(model, names: Iterable[str], detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Collect the value at each named site (the last forward pass wins)."""
    acts: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Patch:
        def fn(x: torch.Tensor) -> torch.Tensor:
            acts[name] = x.detach() if detach else x
            return x

        return fn

    with patch(model, {name: keep(name) for name in names}):
        yield acts


def blend(x: torch.Tensor, keep: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
    """Per channel (last dim): keep·x + (1 − keep)·replacement. `keep` may be bool or soft in [0, 1]."""
    keep = keep.to(x.dtype)
    return x * keep + replacement.to(x.dtype) * (1 - keep)


@contextmanager
def mean_ablate(model, ablations: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """For each site: {name: (ablate_mask [dim] bool, means [dim])}; masked channels are set to their mean.

    Zero-ablation is the same call with zero means.
    """
    fns = {name: (lambda x, m=mask, mu=means: blend(x, ~m.bool(), mu)) for name, (mask, means) in ablations.items()}
    with patch(model, fns):
        yield
