"""Shared plumbing for the small Hydra tools (`python -m sparse_lm.sample`, `python -m sparse_lm.inspect`)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sparse_lm import checkpoint
from sparse_lm.config import Config
from sparse_lm.model import GPT

CHECKOUT = Path(__file__).resolve().parents[1]  # train.py and conf/ sit beside the package (an editable install)


def positional_checkpoint() -> None:
    """Let `python -m sparse_lm.X <run dir or checkpoint>` stand for `... checkpoint=<path>`."""
    if len(sys.argv) > 1 and "=" not in sys.argv[1] and not sys.argv[1].startswith("-"):
        quoted = sys.argv[1].replace("\\", "\\\\").replace("'", "\\'")
        sys.argv[1] = f"checkpoint='{quoted}'"


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, config, checkpoint state) from a run directory or checkpoint."""
    ckpt = checkpoint.resolve(path)
    cfg: Config = checkpoint.load_config(ckpt)
    model = GPT(cfg.model)
    model.load_state_dict(checkpoint.load_weights(ckpt))
    return model.to(device).eval(), checkpoint.load_tokenizer(ckpt), cfg, checkpoint.load_state(ckpt)


def compose_fresh(conf_dir: Path, name: str, overrides: list[str]):
    """Compose `name` from `conf_dir` with `overrides` (a DictConfig), inside or outside a running Hydra app."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose(name, overrides=overrides)
    finally:
        restore_gh_from_backup(backup)
