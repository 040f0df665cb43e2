"""Pruning a model to a task's circuit (docs/method.md §5).

1. Means: every node's mean activation over pretraining data; a pruned node is replaced by it.
2. Mask training: one real τ per node, clamped to [−1, 1]. The forward pass keeps a node when τ ≥ 0 (a hard
   step); the backward pass uses the sigmoid's derivative instead (straight-through). The objective is the
   task loss plus λ·(number of kept nodes).
3. Bisection: nodes ordered by τ, find the smallest number kept whose held-out task loss is at most the target,
   judged as PruneConfig.calibration says (`Judge`): on the raw logits (default, the paper's order), after one
   logit scale and shift fitted on the full model, or after a scale and shift refitted for every candidate.
   The circuit found gets its own fit (on training pairs) once, and both losses are reported.

Task loss: cross-entropy restricted to the two answer tokens, per side (the mean over A and B contexts).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from sparse_lm.circuits.nodes import Ablation, NodeSpace, ablated
from sparse_lm.config import Calibration, PruneConfig
from sparse_lm.hooks import record
from sparse_lm.model import GPT
from sparse_lm.circuits.tasks import TaskData


@torch.no_grad()
def site_stats(model: GPT, sites: list[str], tokens: torch.Tensor, top: int = 5, batch: int = 16) -> dict:
    """Over all positions of `tokens` [n, T], in one pass: every site's channel means ("means": site -> [dim]) and each
    channel's `top` largest activations ("top_values") with where they occur ("top_positions": flat index n·T + t)."""
    sums, best, count = {}, {}, 0
    device = model.lm_head.weight.device
    for start in range(0, tokens.shape[0], batch):
        chunk = tokens[start : start + batch]
        with record(model, sites) as acts:
            model(chunk.to(device))
        for site in sites:
            a = acts[site].float().flatten(0, 1).cpu()  # [positions, dim]
            sums[site] = sums[site] + a.sum(0) if site in sums else a.sum(0)
            values, where = a.topk(min(top, a.shape[0]), dim=0)
            where = where + start * tokens.shape[1]
            if site in best:
                values, pick = torch.cat([best[site][0], values]).topk(min(top, len(values) + len(best[site][0])), dim=0)
                where = torch.cat([best[site][1], where]).gather(0, pick)
            best[site] = (values, where)
        count += chunk.numel()
    return {"means": {site: s / count for site, s in sums.items()}, "top_values": {s: v for s, (v, _) in best.items()},
            "top_positions": {s: w for s, (_, w) in best.items()}}


def site_means(model: GPT, sites: list[str], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean of every site's channels over all positions of `tokens` [n, T]."""
    return site_stats(model, sites, tokens, top=1)["means"]


def logit_diff(model: GPT, data: TaskData, batch: int = 256) -> torch.Tensor:
    """logit(a) − logit(b) at the last position of every context [2n]."""
    out, device = [], model.lm_head.weight.device
    for start in range(0, data.tokens.shape[0], batch):
        tokens, lengths = data.tokens[start : start + batch].to(device), data.lengths[start : start + batch].to(device)
        T = int(lengths.max())
        last, _ = model(tokens[:, :T], last=lengths - 1)  # right padding never reaches earlier positions (causal)
        out.append(last[:, data.answers[0]] - last[:, data.answers[1]])
    return torch.cat(out)


def side_losses(delta: torch.Tensor, scale=1.0, shift=0.0) -> torch.Tensor:
    """Two-way cross-entropy per context: A sides (first half) want a, B sides want b."""
    z = scale * delta.float() + shift
    n = len(z) // 2
    return torch.cat([F.softplus(-z[:n]), F.softplus(z[n:])])


def accuracy(delta: torch.Tensor) -> float:
    """Share of contexts whose logit difference prefers the right answer (a on the A sides, b on the B sides)."""
    n = len(delta) // 2
    return torch.cat([delta[:n] > 0, delta[n:] < 0]).float().mean().item()


def calibrate(delta: torch.Tensor, steps: int = 100) -> tuple[float, float]:
    """Logit scale (> 0) and shift minimising the task loss on `delta` (LBFGS).

    The scale stays positive: calibration may fix the size and bias of the logit difference, never flip a
    model that prefers the wrong answer into one that prefers the right one. The fit runs on the standardised
    difference, so a large common offset (mean ablation often adds one) costs it no extra steps.
    """
    delta = delta.detach().float()
    mu, sd = delta.mean(), delta.std()
    sd = sd if sd > 1e-6 else torch.ones(())
    u = (delta - mu) / sd
    params = torch.tensor([0.0, 0.0], requires_grad=True)  # log scale, shift, both in standardised units
    opt = torch.optim.LBFGS([params], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = side_losses(u, params[0].exp(), params[1]).mean()
        loss.backward()
        return loss

    opt.step(closure)
    a, c = params[0].exp().item(), params[1].item()
    return a / sd.item(), c - a * (mu / sd).item()


def straight_through(tau: torch.Tensor) -> torch.Tensor:
    """Forward: 1[τ ≥ 0]. Backward: d/dτ sigmoid(τ)."""
    soft = torch.sigmoid(tau)
    return (tau >= 0).to(tau.dtype) + soft - soft.detach()


def train_masks(model: GPT, space: NodeSpace, how: Ablation, train: TaskData, cfg: PruneConfig, seed: int,
                progress: Callable[[int, float, int], None] | None = None) -> torch.Tensor:
    """τ for every node after `cfg.steps` steps of AdamW on task loss + λ·kept (model weights frozen)."""
    g = torch.Generator().manual_seed(seed)
    tau = (cfg.tau_init + 0.01 * torch.randn(space.total, generator=g)).to(model.lm_head.weight.device).requires_grad_(True)
    opt = torch.optim.AdamW([tau], lr=cfg.lr, weight_decay=cfg.weight_decay)
    for step in range(cfg.steps):
        pick = torch.randint(train.n_pairs, (cfg.batch_pairs,), generator=g)  # on the CPU: same picks on any device
        batch = train.select(pick)
        keep = straight_through(tau)
        # A fresh resampling draw every step (the seed only makes the sequence reproducible).
        with ablated(model, space, keep, replace(how, seed=how.seed * 1_000_003 + step)):
            task = side_losses(logit_diff(model, batch)).mean()
        loss = task + cfg.lam * keep.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            tau.clamp_(-1.0, 1.0)
        if progress is not None:
            progress(step, task.item(), int((tau >= 0).sum()))
    return tau.detach()


def keep_top(order: torch.Tensor, n: int, total: int) -> torch.Tensor:
    keep = torch.zeros(total, device=order.device)
    keep[order[:n]] = 1.0
    return keep


@dataclass
class Evaluation:
    """Held-out task loss per side of a set of kept nodes."""

    loss: float  # as the Judge scores it against the target
    raw_loss: float  # the logits as they are
    accuracy: float  # held-out contexts whose raw logit difference prefers the right answer
    calibrated_loss: float | None = None  # after a logit scale and shift fitted on training pairs for these nodes
    scale: float | None = None
    shift: float | None = None


@torch.no_grad()
def logit_diffs(model: GPT, space: NodeSpace, how: Ablation, keep: torch.Tensor, data: TaskData) -> torch.Tensor:
    with ablated(model, space, keep, how):
        return logit_diff(model, data)


class Judge:
    """Scores kept-node sets on held-out pairs as PruneConfig.calibration says (docs/method.md §5).

    The full model is judged the same way as the candidates: under `raw` it solves a task when its raw held-out
    loss reaches the target; under `fixed` and `per_candidate`, after a scale and shift fitted on it.
    """

    def __init__(self, model: GPT, space: NodeSpace, how: Ablation, calib: TaskData, test: TaskData, mode: Calibration):
        self.model, self.space, self.how, self.calib, self.test, self.mode = model, space, how, calib, test, mode
        self.fixed = (1.0, 0.0)
        if mode == Calibration.fixed:
            self.fixed = calibrate(logit_diffs(model, space, how, torch.ones(space.total), calib))

    def __call__(self, keep: torch.Tensor, fit: bool = False) -> Evaluation:
        """Evaluate `keep`; with `fit`, also fit this set's own scale and shift and report the calibrated loss."""
        delta = logit_diffs(self.model, self.space, self.how, keep, self.test)
        own = calibrate(logit_diffs(self.model, self.space, self.how, keep, self.calib)) if fit or self.mode == Calibration.per_candidate else None
        scale, shift = own if self.mode == Calibration.per_candidate else self.fixed
        ev = Evaluation(loss=side_losses(delta, scale, shift).mean().item(), raw_loss=side_losses(delta).mean().item(),
                        accuracy=accuracy(delta))
        if own is not None:
            ev.scale, ev.shift = own
            ev.calibrated_loss = side_losses(delta, *own).mean().item()
        return ev


def smallest_passing(passes: Callable[[int], bool], total: int, hint: int | None = None, whole_passes: bool = True) -> int | None:
    """Smallest n in [0, total] with passes(n), assuming passing is monotone in n; None if there is none.

    `hint` (e.g. the number of nodes the trained masks keep) splits the range first: fewer evaluations. With
    `whole_passes=False` (a model that fails the task whole, like the random-init control) only sizes up to the
    hint are searched: pruning may still carve a passing circuit out of it.
    """
    if whole_passes and not passes(total):
        return None
    if not whole_passes:
        if hint is None or not passes(hint):
            return None
        total = hint
    if passes(0):
        return 0
    lo, hi = 0, total  # passes(lo) is False, passes(hi) is True
    if hint is not None and 0 < hint < total:
        lo, hi = (lo, hint) if passes(hint) else (hint, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    return hi
