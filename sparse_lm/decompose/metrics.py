"""How close a decomposition is to a known mechanism (the toys' ground truth) and how many pieces it uses.

- `mmcs_l2r`: for each ground-truth piece, the best-matching learned component by cosine similarity of the whole
  matrix; the mean of those maxima (mean max cosine similarity, 1 = every piece found) and the mean ratio of the
  matched component's norm to the piece's (1 = found at the right size).
- `mmcs_l2r_support`: the published, more lenient version: each learned component is first cut to the known
  piece's support (for TMS, one column of W₁ or one row of W₂), so a component spread over several features
  still scores 1 on each of them.
- `one_hot_importance`: the causal importance of every subcomponent when exactly one feature is on; in a faithful
  decomposition of TMS each feature switches on exactly one subcomponent per matrix.
- `live`: subcomponents whose importance exceeds a threshold on some input.
"""

from __future__ import annotations

import torch


def cosines(components: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """[F, C]: cosine similarity of every ground-truth piece [F, d_out, d_in] with every learned one [C, d_out, d_in]."""
    c = components.reshape(components.shape[0], -1)
    t = truth.reshape(truth.shape[0], -1)
    return (t @ c.T) / (t.norm(dim=1, keepdim=True) * c.norm(dim=1)[None, :]).clamp_min(1e-12)


def mmcs_l2r(components: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """components [C, d_out, d_in], truth [F, d_out, d_in] → (mean max cosine, mean L2 ratio of the best match)."""
    c = components.reshape(components.shape[0], -1)
    t = truth.reshape(truth.shape[0], -1)
    best, idx = cosines(components, truth).max(dim=1)
    ratio = c[idx].norm(dim=1) / t.norm(dim=1).clamp_min(1e-12)
    return best.mean().item(), ratio.mean().item()


def mmcs_l2r_support(components: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """As mmcs_l2r, with every component restricted to each known piece's nonzero entries before comparing."""
    support = (truth != 0).to(components.dtype)  # [F, d_out, d_in]
    cut = torch.einsum("coi,foi->fcoi", components, support).flatten(2)  # [F, C, n]
    t = truth.flatten(1)
    cos = torch.einsum("fcn,fn->fc", cut, t) / (cut.norm(dim=2) * t.norm(dim=1, keepdim=True)).clamp_min(1e-12)
    best, idx = cos.max(dim=1)
    ratio = cut[torch.arange(len(t)), idx].norm(dim=1) / t.norm(dim=1).clamp_min(1e-12)
    return best.mean().item(), ratio.mean().item()


def one_hot_importance(spd, n_features: int, value: float = 0.75) -> dict[str, torch.Tensor]:
    """Per matrix, [n_features, C]: the causal importances with only feature i on (at `value`)."""
    x = torch.eye(n_features) * value
    with torch.no_grad():
        _, inputs = spd.run_target(x)
        g, _ = spd.importances(inputs)
    return g


def identity_stats(ci: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """From one-hot importances [F, C]: features with exactly one subcomponent above threshold, and the identity
    error: mean |CI − I| after each feature is matched to its most important subcomponent (each used once at most)."""
    F_, C = ci.shape
    above = (ci > threshold).sum(dim=1)
    order = ci.max(dim=1).values.argsort(descending=True)
    used, perm = set(), torch.full((F_,), -1, dtype=torch.long)
    for f in order.tolist():
        for c in ci[f].argsort(descending=True).tolist():
            if c not in used:
                used.add(c)
                perm[f] = c
                break
    matched = ci[:, perm] if (perm >= 0).all() else ci
    ideal = torch.eye(F_)
    error = (matched - ideal).abs().mean().item() if (perm >= 0).all() else float("nan")
    # the importances outside the matched subcomponents: a clean decomposition leaves them all at 0
    rest = ci.clone()
    rest[:, perm[perm >= 0]] = 0
    return {"features_with_one": int((above == 1).sum()), "features": F_, "identity_error": error,
            "max_off_match": rest.max().item() if C > F_ else 0.0}


def live(g: torch.Tensor, threshold: float = 0.1) -> int:
    """Subcomponents whose importance exceeds threshold on some input of g [..., C]."""
    return int((g.reshape(-1, g.shape[-1]) > threshold).any(dim=0).sum())
