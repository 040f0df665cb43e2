"""Print completions of a prompt from a checkpoint.

    python -m sparse_lm.sample runs/tiny prompt='def parse(' num_samples=3 temperature=0.8 top_k=50 seed=0
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig

from sparse_lm.cli import load_model, positional_checkpoint
from sparse_lm.config import SampleConfig, register_configs, to_object
from sparse_lm.distributed import pick_device
from sparse_lm.errors import UserError, reported
from sparse_lm.model import GPT


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend idx [B, T] by sampling; temperature 0 means greedy."""
    for _ in range(max_new_tokens):
        context = idx[:, -model.cfg.ctx_len :]
        logits, _ = model(context, last=torch.full((len(idx),), context.shape[1] - 1, device=idx.device))
        logits = logits.float()
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


def sample(cfg: SampleConfig) -> list[str]:
    device = pick_device(cfg.device)
    model, tok, _, _ = load_model(cfg.checkpoint, device)
    ids = tok.encode(cfg.prompt).ids
    if not ids:
        raise UserError("prompt is empty: give at least one character, e.g. prompt='def '")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    idx = torch.tensor([ids] * cfg.num_samples, device=device)
    out = generate(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, gen)
    return [tok.decode(row.tolist()) for row in out]


@hydra.main(config_path="../conf", config_name="sample", version_base="1.3")
@reported
def main(dcfg: DictConfig) -> None:
    cfg: SampleConfig = to_object(dcfg, SampleConfig)
    for i, text in enumerate(sample(cfg)):
        print(f"----- sample {i} (seed {cfg.seed}) -----")
        print(text)


if __name__ == "__main__":
    register_configs()
    positional_checkpoint()
    main()
