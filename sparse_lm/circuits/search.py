"""One search (docs/method.md §5): train node masks on a task's training pairs, then bisect on held-out pairs to the
smallest circuit whose loss reaches the target, as the Judge scores it; check what removing it does."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparse_lm.circuits.nodes import Ablation, NodeSpace
from sparse_lm.circuits.pruning import Evaluation, Judge, keep_top, smallest_passing, train_masks
from sparse_lm.circuits.tasks import TaskData
from sparse_lm.config import PruneConfig
from sparse_lm.model import GPT


@dataclass
class Circuit:
    """What one search found for one model, task, ablation mode and mask seed."""

    task: str
    total_nodes: int
    full: Evaluation  # the whole model on the held-out pairs
    solved: bool  # the whole model reaches the target, judged as the candidates are
    seed: int
    ablation: str
    nodes: int | None = None  # None: no circuit reaches the target (or none was searched for)
    kept: dict[str, list[int]] = field(default_factory=dict)  # site -> kept channels
    circuit: Evaluation | None = None  # the circuit alone (everything else ablated), with its own calibration fit
    without: Evaluation | None = None  # the whole model with the circuit ablated (necessity)
    evaluations: int = 0  # forward evaluations the bisection took
    edges: dict[str, int] | None = None  # edge counts by kind (circuits/edges.py), filled in by the battery

    @property
    def found(self) -> bool:
        return self.nodes is not None


def find_circuit(model: GPT, how: Ablation, train: TaskData, test: TaskData, cfg: PruneConfig, seed: int | None = None,
                 control: bool = False, log=print) -> Circuit:
    """Train masks on `train`, bisect on `test`.

    A model that fails the task whole gets no search, unless it is a `control` (a random-init model, a nonsense
    task): whether masks can carve a passing circuit out of it is what the control measures, so it is searched up
    to the size the trained masks keep.
    """
    seed = cfg.seed if seed is None else seed
    space = NodeSpace.of(model)
    judge = Judge(model, space, how, train.subset(cfg.n_calib), test, cfg.calibration)
    everything = torch.ones(space.total)
    full = judge(everything, fit=True)
    result = Circuit(train.name, space.total, full, full.loss <= cfg.target, seed, how.mode)
    if not result.solved:
        log(f"  the whole model does not reach the target (loss {full.loss:.3f} > {cfg.target})" + (": searched anyway (control)" if control else ": no search"))
        if not control:
            return result

    def progress(step, loss, kept):
        if (step + 1) % max(1, cfg.steps // 4) == 0:
            log(f"  mask step {step + 1}/{cfg.steps}: task loss {loss:.3f}, {kept} nodes kept")

    tau = train_masks(model, space, how, train, cfg, seed, progress)
    order = torch.argsort(tau, descending=True, stable=True)
    cache = {space.total: full}

    def at(n: int) -> Evaluation:
        if n not in cache:
            cache[n] = judge(keep_top(order, n, space.total))
        return cache[n]

    n = smallest_passing(lambda k: at(k).loss <= cfg.target, space.total, hint=int((tau >= 0).sum()), whole_passes=result.solved)
    result.evaluations = len(cache) - 1  # the whole model's evaluation came first
    if n is None:
        log("  no circuit of at most the masks' size reaches the target")
        return result
    keep = keep_top(order, n, space.total)
    result.nodes, result.kept = n, space.kept(keep)
    result.circuit = judge(keep, fit=True)  # the circuit's own calibration, fitted once (reported beside the raw loss)
    if cfg.check:
        result.without = judge(1 - keep, fit=True)
    return result
