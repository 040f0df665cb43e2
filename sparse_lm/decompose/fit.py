"""The optimisation loop both decompositions share: AdamW with a cosine decay to 0, an optional faithfulness-only
warmup of the components (SPD), progress lines, periodic evaluation, and a resumable checkpoint.

The checkpoint (<out_dir>/decomposition.pt) holds the decomposition's state dict, the optimiser's, the step, the
data generator's state and the history; it is written atomically, so an interrupted run resumes from the last one
and a crash never leaves a half-written file.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from sparse_lm.errors import UserError
from sparse_lm.fsutil import atomic_file


@dataclass
class Plan:
    steps: int
    lr: float
    coeffs: dict[str, float]  # loss name -> coefficient (a loss without one is logged, not optimised)
    warmup_steps: int = 0  # faithfulness only, on the parameters `warmup_params` names
    warmup_lr: float = 0.01
    eval_interval: int = 1000
    ckpt_interval: int = 1000
    history: list = field(default_factory=list)


def cosine(step: int, steps: int, lr: float) -> float:
    return lr * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))


def fit(dec: torch.nn.Module, losses: Callable[[int], dict[str, torch.Tensor]], plan: Plan, ckpt: Path,
        generator: torch.Generator, evaluate: Callable[[], dict] | None = None, log=print,
        warmup_params: list[torch.nn.Parameter] | None = None, settings: str = "") -> list[dict]:
    """Train `dec` on `losses(step)` (which draws its own batch from `generator`); returns the history of
    evaluations. Resumes from `ckpt` when it exists and was written with the same `settings`."""
    opt = torch.optim.AdamW(dec.parameters(), lr=plan.lr, weight_decay=0.0)
    start, history = 0, []
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state.get("settings") != settings:
            raise UserError(f"{ckpt} was written with other settings; continue it with the same ones, or start over with "
                            f"overwrite=true or another out_dir")
        dec.load_state_dict(state["decomposition"])
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start, history = state["step"], [dict(h) for h in state["history"]]
        log(f"resumed {ckpt} at step {start}/{plan.steps}")
    elif plan.warmup_steps and warmup_params:
        wopt = torch.optim.AdamW(warmup_params, lr=plan.warmup_lr, weight_decay=0.1)
        for _ in range(plan.warmup_steps):
            loss = dec.faithfulness()
            wopt.zero_grad(set_to_none=True)
            loss.backward()
            wopt.step()
        log(f"faithfulness warmup: {plan.warmup_steps} steps, faithfulness {dec.faithfulness().item():.3e}")

    def save(step):
        with atomic_file(ckpt) as tmp:
            torch.save({"decomposition": dec.state_dict(), "optimizer": opt.state_dict(), "generator": generator.get_state(),
                        "step": step, "history": history, "settings": settings}, tmp)

    t0, done = time.time(), start
    for step in range(start, plan.steps):
        for g in opt.param_groups:
            g["lr"] = cosine(step, plan.steps, plan.lr)
        terms = losses(step)
        total = sum(plan.coeffs.get(k, 0.0) * v for k, v in terms.items())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        done = step + 1
        last = done == plan.steps
        if done % max(1, plan.steps // 50) == 0 or last:
            rate = (done - start) / max(time.time() - t0, 1e-9)
            eta = (plan.steps - done) / max(rate, 1e-9)
            parts = " | ".join(f"{k} {v.item():.3e}" for k, v in terms.items())
            log(f"step {done}/{plan.steps} | loss {total.item():.3e} | {parts} | {rate:.1f} steps/s | ETA {eta / 60:.1f} min")
        if evaluate and (done % plan.eval_interval == 0 or last):
            row = {"step": done, "loss": total.item(), **{k: v.item() for k, v in terms.items()}, **evaluate()}
            history.append(row)
            log("eval " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        if done % plan.ckpt_interval == 0 or last:
            save(done)
    return history
