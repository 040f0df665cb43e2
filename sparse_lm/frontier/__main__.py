"""`python -m sparse_lm.frontier frontier=cpu [launcher=submitit_local] [stage=collect]` (conf/frontier.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sparse_lm.config import FrontierConfig, register_configs, to_object
from sparse_lm.errors import reported
from sparse_lm.frontier.sweep import run


@hydra.main(config_path="../../conf", config_name="frontier", version_base="1.3")
@reported
def main(dcfg: DictConfig) -> None:
    run(to_object(dcfg, FrontierConfig))


if __name__ == "__main__":
    register_configs()
    main()
