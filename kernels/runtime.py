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


def time_ms(fn, cuda: bool, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds per call: CUDA events (triton.testing.do_bench) on a GPU, the wall clock on the CPU."""
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    import statistics
    import time

    end = time.perf_counter() + warmup_ms / 1e3
    while True:
        fn()
        if time.perf_counter() > end:
            break
    times, end = [], time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def feature_major(t: torch.Tensor) -> bool:
    """A 2-D [tokens, features] tensor stored along tokens (the transpose of a contiguous [features, tokens])."""
    return t.dim() == 2 and t.shape[0] > 1 and t.stride(0) == 1 and t.stride(1) == t.shape[0]
