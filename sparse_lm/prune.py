"""Prune a checkpoint to the smallest circuit for each task and count its edges (docs/method.md §5).

    python -m sparse_lm.prune checkpoint=runs/tiny tasks=all
    python -m sparse_lm.prune runs/tiny tasks=[bracket_counting,set_or_string] controls=all seeds=3

The method lives in sparse_lm/circuits/ (the invocation: circuits/prune.py); this is its Hydra entry point.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sparse_lm.circuits.prune import run
from sparse_lm.cli import positional_checkpoint
from sparse_lm.config import PruneConfig, register_configs, to_object
from sparse_lm.errors import reported


@hydra.main(config_path="../conf", config_name="prune", version_base="1.3")
@reported
def main(dcfg: DictConfig) -> None:
    run(to_object(dcfg, PruneConfig))


if __name__ == "__main__":
    register_configs()
    positional_checkpoint()
    main()
