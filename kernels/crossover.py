"""The density below which a layer's training step is faster over compressed copies than dense (docs/method.md §4).

`crossover_density` times, on the GPU at hand, the three matmuls of one layer's step (Y = X·Wᵀ, dX = dY·W and
the dense dW = dYᵀ·X) both ways at a few densities; `sparse_lm.backends` calls it once per matrix shape when
`kernels.calibrate=true`, and the benchmarks reuse `layer_ops`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.compress import compress
from kernels.runtime import time_ms
from kernels.spmm import matmul_t


def random_sparse_weight(shape, density: float, device, seed: int = 0) -> torch.Tensor:
    """N(0, 0.02) weights with all but the max(1, floor(density · numel)) largest |w| set to zero."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(*shape, device=device, generator=g) * 0.02
    k = max(1, math.floor(density * w.numel()))
    keep = torch.zeros(w.numel(), dtype=torch.bool, device=device)
    keep[w.abs().flatten().topk(k, sorted=False).indices] = True
    return w * keep.view_as(w)


def layer_ops(w: torch.Tensor, tokens: int, dtype: torch.dtype, backends: list[str]) -> dict[str, dict]:
    """For each backend, callables for forward (Y = X·Wᵀ), dX (= dY·W) and a layer step (forward, dX, dense dW)."""
    out, inp = w.shape
    k = int((w != 0).sum())
    x = torch.randn(tokens, inp, device=w.device, dtype=dtype)
    dy = torch.randn(tokens, out, device=w.device, dtype=dtype)
    wd = w.to(dtype)
    ops = {"dense": {"forward": lambda: F.linear(x, wd), "dx": lambda: dy @ wd}}
    for impl in backends:
        if impl == "dense":
            continue
        fwd, bwd = compress(w, k, dtype), compress(w.t(), k, dtype)
        if impl == "torch_sparse":
            fwd.to_torch_sparse(), bwd.to_torch_sparse()  # built once, as in training
        ops[impl] = {"forward": lambda f=fwd, i=impl: matmul_t(x, f, i), "dx": lambda b=bwd, i=impl: matmul_t(dy, b, i),
                     "rebuild": lambda: (compress(w, k, dtype), compress(w.t(), k, dtype))}
    for impl, o in ops.items():
        o["step"] = lambda o=o: (o["forward"](), o["dx"](), dy.t() @ x)
    return ops


def crossover_density(shape, tokens: int, dtype: torch.dtype, densities=(0.1, 0.06, 0.04, 0.03, 0.02, 0.01)) -> float:
    """The largest density at which the Triton layer step beats the dense one on this GPU (0 if none does)."""
    device = torch.device("cuda")
    for density in sorted(densities, reverse=True):
        ops = layer_ops(random_sparse_weight(shape, density, device), tokens, dtype, ["dense", "triton"])
        if time_ms(ops["triton"]["step"], True) < time_ms(ops["dense"]["step"], True):
            return density
    return 0.0
