"""`python -m sparse_lm.bench [mode=ops|train|versus|profile] [field=value ...]`: results go to bench/<date>_<time>_<mode>/."""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sparse_lm.config import BenchConfig, register_configs, to_object
from sparse_lm.errors import UserError, reported
from sparse_lm.distributed import pick_device


@hydra.main(config_path="../../conf", config_name="bench", version_base="1.3")
@reported
def main(dcfg: DictConfig) -> None:
    cfg: BenchConfig = to_object(dcfg, BenchConfig)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.mode == "versus":
        from sparse_lm.bench.versus import run_versus

        run_versus(cfg, out_dir)
        return
    if cfg.mode == "profile":
        from sparse_lm.bench.profile import run_profile

        run_profile(cfg, out_dir)
        return
    device = pick_device(cfg.device)
    if cfg.mode == "ops":
        from sparse_lm.bench.ops import run_ops

        run_ops(cfg, device, out_dir)
    elif cfg.mode == "train":
        from sparse_lm.bench.train import run_training

        run_training(cfg, device, out_dir)
    else:
        raise UserError(f"mode={cfg.mode!r}: choose ops, train, versus or profile")


if __name__ == "__main__":
    register_configs()
    main()
