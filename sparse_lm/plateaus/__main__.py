"""`python -m sparse_lm.plateaus checkpoint=<run> [compare=[<run>, ...]]` (conf/plateaus.yaml; the protocol: protocol.py)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sparse_lm.cli import positional_checkpoint
from sparse_lm.config import PlateausConfig, register_configs, to_object
from sparse_lm.errors import reported
from sparse_lm.plateaus.run import run


@hydra.main(config_path="../../conf", config_name="plateaus", version_base="1.3")
@reported
def main(dcfg: DictConfig) -> None:
    run(to_object(dcfg, PlateausConfig))


if __name__ == "__main__":
    register_configs()
    positional_checkpoint()
    main()
