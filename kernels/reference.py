"""The torch reference of what the selection kernels compute, with the framework's tie rule.

The weight projection keeps exactly k entries of largest |w| (ties to the lower flat index), after protecting the
j largest of every neuron; fused AbsTopK keeps the k largest |x| of every row (ties to the lower index). These are
the definitions: sparse_lm.sparsity projects with them wherever the kernels are off, and the tests and
`python -m kernels.check` require the kernels to reproduce them entry for entry. Plain torch, no host sync.
"""

from __future__ import annotations

import torch


def topk_mask(scores: torch.Tensor, k: int, dim: int | None = None) -> torch.Tensor:
    """Boolean mask of exactly k largest non-negative scores (over the whole tensor, or per slice along `dim`).

    Ties at the threshold go to the lowest index. No host synchronisation: the count of tied entries to
    take is a tensor.
    """
    if dim is None:
        return topk_mask(scores.reshape(-1), k, 0).view_as(scores)
    n = scores.shape[dim]
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if scores.dtype == torch.float32:
        scores = scores.view(torch.int32)  # non-negative floats order like their bit patterns; ints compare faster
    threshold = scores.topk(k, dim=dim, sorted=False).values.amin(dim=dim, keepdim=True)
    above = scores > threshold
    tied = scores == threshold
    need = k - above.sum(dim=dim, keepdim=True)
    return above | (tied & (tied.cumsum(dim=dim) <= need))


def protected_mask(w: torch.Tensor, j: int, neuron_axis: int | None) -> torch.Tensor | None:
    """The j largest |w| of every neuron (each row for axis 0, each column for axis 1), or None."""
    if j <= 0 or neuron_axis is None:
        return None
    return topk_mask(w.detach().abs().float(), j, dim=1 - neuron_axis)


def projection_mask(w: torch.Tensor, k: int, j: int = 0, neuron_axis: int | None = None) -> torch.Tensor:
    """The entries a projection to k nonzeros keeps, with the j largest of every neuron protected."""
    score = w.detach().abs().float()
    protected = protected_mask(w, j, neuron_axis)
    if protected is not None:
        score = score.masked_fill(protected, float("inf"))
    return topk_mask(score, k)
