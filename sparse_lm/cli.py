"""Shared plumbing for the small Hydra tools (`python -m sparse_lm.sample`, `python -m sparse_lm.inspect`)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sparse_lm import checkpoint
from sparse_lm.config import Config
from sparse_lm.model import GPT


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
