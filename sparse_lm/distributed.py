"""Process-group setup for torchrun (gloo on CPU, NCCL on GPU); a single process needs nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as td

from sparse_lm.errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(pref)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"train.device={pref} but torch sees no CUDA device (use train.device=cpu or auto)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init(device_pref: str) -> Dist:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if world > 1 and not td.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Long timeout: the other processes wait at a barrier while the first one builds the token cache.
        td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return Dist(rank, world, local_rank, device)


def barrier(dist: Dist) -> None:
    if dist.enabled:
        td.barrier()


def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        td.all_reduce(t)
    return t


def any_rank(flag: bool, dist: Dist) -> bool:
    """True on every process if `flag` is true on any (e.g. one of them received SIGTERM)."""
    if not dist.enabled:
        return flag
    return all_reduce_sum(torch.tensor(float(flag), device=dist.device), dist).item() > 0


def shutdown(dist: Dist) -> None:
    if dist.enabled and td.is_initialized():
        td.destroy_process_group()
