"""Train a weight-sparse GPT: `python train.py [preset=paper] [group.key=value ...]` (configs in conf/)."""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sparse_lm.config import register_configs, to_object
from sparse_lm.errors import reported

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
@reported  # a user error ends in one line (the traceback with HYDRA_FULL_ERROR=1)
def main(cfg: DictConfig) -> float | None:
    from sparse_lm.trainer import train  # after Hydra has parsed the command line: --help stays fast

    hc = HydraConfig.get()
    record = {  # what Hydra would write to .hydra/, written by train() once the start is accepted
        "config.yaml": OmegaConf.to_yaml(cfg),
        "overrides.yaml": OmegaConf.to_yaml(list(hc.overrides.task)),
        "hydra.yaml": OmegaConf.to_yaml({"hydra": OmegaConf.to_container(hc, resolve=False)}),
    }
    metrics = train(to_object(cfg), Path(hc.runtime.output_dir), record)
    return metrics.get("val_loss")  # the value a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
