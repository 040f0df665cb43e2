"""Batches of token chunks whose order is a pure function of (seed, step).

The token stream is cut into chunks of ctx_len + 1 tokens (inputs and shifted targets). Each epoch visits
every chunk once in a seeded random order. Because the sample index of every row follows from the step
number, resuming needs no sampler state beyond the step, and each DDP rank reads its own disjoint rows.
"""

from __future__ import annotations

import numpy as np
import torch

from sparse_lm.errors import UserError


class ChunkSampler:
    def __init__(self, tokens: np.ndarray, ctx_len: int, seed: int):
        self.tokens, self.ctx_len, self.seed = tokens, ctx_len, seed
        self.n_chunks = (len(tokens) - 1) // ctx_len
        if self.n_chunks < 1:
            raise UserError(f"the token stream ({len(tokens)} tokens) is shorter than one context of {ctx_len + 1}")
        self._epoch, self._perm = -1, None

    def chunk_index(self, sample: int) -> int:
        epoch, pos = divmod(sample, self.n_chunks)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n_chunks, generator=g)
        return int(self._perm[pos])

    def rows(self, chunk_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.ctx_len
        data = np.stack([self.tokens[c * T : c * T + T + 1] for c in chunk_ids]).astype(np.int64)
        data = torch.from_numpy(data)
        return data[:, :-1], data[:, 1:]

    def batch(self, first_sample: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows for global sample indices first_sample .. first_sample + size - 1."""
        return self.rows([self.chunk_index(first_sample + i) for i in range(size)])


def train_batch(sampler: ChunkSampler, step: int, micro: int, rank: int, world: int, micro_bs: int, accum: int):
    """Micro-batch `micro` of optimizer step `step` for process `rank`: a disjoint slice of the global batch."""
    global_bs = micro_bs * accum * world
    first = step * global_bs + (micro * world + rank) * micro_bs
    return sampler.batch(first, micro_bs)


def val_batches(tokens: np.ndarray, ctx_len: int, n_sequences: int, micro_bs: int, rank: int = 0, world: int = 1):
    """A fixed, evenly spaced set of `n_sequences` validation chunks (the same every evaluation, whatever the
    micro-batch size), split across ranks and served `micro_bs` at a time."""
    n_chunks = (len(tokens) - 1) // ctx_len
    total = min(n_sequences, n_chunks)
    if total == 0:
        return
    ids = np.linspace(0, n_chunks - 1, total).astype(np.int64).tolist()
    sampler = ChunkSampler(tokens, ctx_len, seed=0)
    mine = ids[rank::world]
    for i in range(0, len(mine), micro_bs):
        yield sampler.rows(mine[i : i + micro_bs])
