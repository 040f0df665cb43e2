"""Where Triton kernels can run: CUDA tensors, or CPU tensors under the interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import torch

# Triton decides at @triton.jit time whether a kernel is interpreted, so the variable must be set before import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def launchable(t: torch.Tensor) -> bool:
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def require_launchable(t: torch.Tensor, what: str) -> None:
    if not launchable(t):
        raise RuntimeError(
            f"{what} is a Triton kernel: it needs a CUDA tensor (or TRITON_INTERPRET=1 set before import, for tests); "
            f"got a tensor on {t.device}"
        )
