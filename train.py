"""Train a weight-sparse GPT: `python train.py [preset=paper] [group.key=value ...]` (configs in conf/)."""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sparse_lm.config import register_configs, to_object

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from sparse_lm.trainer import train  # after Hydra has parsed the command line: --help stays fast

    metrics = train(to_object(cfg), Path(HydraConfig.get().runtime.output_dir))
    return metrics.get("val_loss")  # the value a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
