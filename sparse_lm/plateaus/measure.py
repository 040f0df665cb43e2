"""How far the output moves along a perturbation path, many path points per forward pass.

The activation at one named site and one position (the last of each prompt) is replaced by each point of a path;
nothing else in the model changes (sparse_lm.hooks.patch). Read-outs at that position: KL(p(point 0) ‖ p(point)) of
the next-token distribution (point 0 is the path's start, so KL is 0 there), and the L2 and cosine distance of a late
residual site from its value at point 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparse_lm.hooks import patch, record


@dataclass
class Curves:
    kl: torch.Tensor  # [n, k]
    l2: torch.Tensor  # [n, k]
    cosine: torch.Tensor  # [n, k]: 1 − cos


def activations(model, site: str, tokens: torch.Tensor) -> torch.Tensor:
    """The site's value at the last position of each prompt [n, d]."""
    with torch.no_grad(), record(model, [site]) as acts:
        model(tokens)
    return acts[site][:, -1].double()


@torch.no_grad()
def along(model, site: str, readout: str, tokens: torch.Tensor, points: torch.Tensor, rows_per_pass: int = 256) -> Curves:
    """Read-outs along paths: tokens [n, T] (prompt of each path), points [n, k, d] (the value put at `site`, last
    position, for each path point)."""
    n, k, d = points.shape
    flat_tokens = tokens.repeat_interleave(k, dim=0)
    flat_points = points.reshape(n * k, d)
    logp, late = [], []
    for i in range(0, n * k, rows_per_pass):
        chunk = flat_points[i : i + rows_per_pass]

        def put(x, values=chunk):
            x = x.clone()
            x[:, -1] = values.to(x.dtype)
            return x

        with patch(model, {site: put}), record(model, [readout]) as acts:
            logits = model(flat_tokens[i : i + rows_per_pass])[0][:, -1]
        logp.append(F.log_softmax(logits.double(), dim=-1))
        late.append(acts[readout][:, -1].double())
    logp = torch.cat(logp).view(n, k, -1)
    late = torch.cat(late).view(n, k, -1)
    p0 = logp[:, :1].exp()
    kl = (p0 * (logp[:, :1] - logp)).sum(-1).clamp_min(0)
    l2 = (late - late[:, :1]).norm(dim=-1)
    cosine = 1 - F.cosine_similarity(late, late[:, :1].expand_as(late), dim=-1)
    return Curves(kl, l2, cosine)
