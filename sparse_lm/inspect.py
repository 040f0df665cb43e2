"""Check a checkpoint against its sparsity schedule, parameter by parameter.

    python -m sparse_lm.inspect runs/tiny            # or a checkpoints/step-N directory

For every parameter: shape, nonzeros, the k the schedule requires at the checkpoint's step, density, and the
smallest nonzero count of any protected neuron. Exits 1 if a sparse matrix or embedding has any count other than its
k, a sparse bias more than its k, or a neuron fewer than j nonzeros.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import hydra
import torch
from omegaconf import DictConfig

from sparse_lm import checkpoint
from sparse_lm.cli import positional_checkpoint
from sparse_lm.config import InspectConfig, register_configs, to_object
from sparse_lm.errors import UserError, reported
from sparse_lm.model import GPT
from sparse_lm.sparsity import Sparsifier


@dataclass
class Row:
    name: str
    shape: tuple
    nonzeros: int
    k: int | None  # None: a dense parameter, not projected
    min_per_neuron: int | None
    j: int | None
    exact: bool = True  # False for biases: they start at 0, and a channel that never gets gradient stays 0

    @property
    def ok(self) -> bool:
        count_ok = self.k is None or self.nonzeros == self.k or (not self.exact and self.nonzeros < self.k)
        return count_ok and (self.j is None or self.min_per_neuron >= self.j)


def inspect_checkpoint(path) -> tuple[str, list[Row]]:
    ckpt = checkpoint.resolve(path)
    cfg = checkpoint.load_config(ckpt)
    state = checkpoint.load_state(ckpt)
    step = state["step"]
    weights = checkpoint.load_weights(ckpt)
    if "converted_from" in state:  # no schedule to check against: report what the weights hold
        source = state["converted_from"]
        found = ", ".join(f"{kind} {d:.4g}" for kind, d in source["densities"].items())
        rows = [Row(name, tuple(w.shape), int((w != 0).sum()), None, None, None) for name, w in weights.items()]
        return f"{ckpt} | converted from {source['dir']} ({source['format']} format) | densities found: {found}", rows
    with torch.device("meta"):  # shapes and names only, no memory
        model = GPT(cfg.model)
    sparsifier = Sparsifier(model, cfg.sparsity, cfg.train.max_steps)
    sparse = {sp.name: sp for sp in sparsifier.params}
    plan = sparsifier.plan(step)
    expected = {name for name, _ in model.named_parameters()}
    if set(weights) != expected:
        raise UserError(f"{ckpt}: parameters {sorted(set(weights) ^ expected)} do not match the model of its config.yaml")
    rows = []
    for name, w in weights.items():
        sp = sparse.get(name)
        k = j = min_neuron = None
        if sp is not None:
            k = plan.k[name]
            if sp.neuron_axis is not None:
                j = min(sparsifier.j(sp), w.shape[1 - sp.neuron_axis])
                min_neuron = int((w != 0).sum(dim=1 - sp.neuron_axis).min())
        rows.append(Row(name, tuple(w.shape), int((w != 0).sum()), k, min_neuron, j, exact=sp is None or sp.kind != "bias"))
    title = f"{ckpt} | step {step} of {cfg.train.max_steps} | sparsity {'on' if cfg.sparsity.enabled else 'off'}"
    return title, rows


def format_table(title: str, rows: list[Row]) -> str:
    lines = [title, f"{'parameter':<32} {'shape':>12} {'nonzeros':>10} {'scheduled k':>12} {'density':>8} {'min/neuron':>11}  ok"]
    for r in rows:
        numel = torch.Size(r.shape).numel()
        k = "dense" if r.k is None else str(r.k)
        neuron = "" if r.j is None else f"{r.min_per_neuron} (j={r.j})"
        lines.append(
            f"{r.name:<32} {'x'.join(map(str, r.shape)):>12} {r.nonzeros:>10} {k:>12} {r.nonzeros / numel:>8.4f} {neuron:>11}  "
            f"{'ok' if r.ok else 'DEVIATES'}"
        )
    bad = [r.name for r in rows if not r.ok]
    lines.append(f"{len(bad)} parameter(s) deviate from the schedule: {', '.join(bad)}" if bad else "every parameter matches its schedule")
    return "\n".join(lines)


@hydra.main(config_path="../conf", config_name="inspect", version_base="1.3")
@reported
def main(dcfg: DictConfig) -> None:
    cfg: InspectConfig = to_object(dcfg, InspectConfig)
    title, rows = inspect_checkpoint(cfg.checkpoint)
    print(format_table(title, rows))
    if not all(r.ok for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    register_configs()
    positional_checkpoint()
    main()
