"""`python -m sparse_lm.decompose decompose=tms_40_10 [method=apd] [checkpoint=<run>]` (conf/decompose.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sparse_lm.config import DecomposeConfig, register_configs, to_object
from sparse_lm.decompose.run import run
from sparse_lm.errors import reported


@hydra.main(config_path="../../conf", config_name="decompose", version_base="1.3")
@reported
def main(dcfg: DictConfig) -> None:
    run(to_object(dcfg, DecomposeConfig))


if __name__ == "__main__":
    register_configs()
    main()
