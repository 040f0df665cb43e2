"""`SparseLinear`: an nn.Linear whose matmuls can run over compressed copies of its sparse weight.

It shares the Parameters of the layer it replaces, so state dicts, optimizers and DDP see no difference.
`mode` is "dense" (F.linear on the masked weight: the reference) or an SpMM implementation ("triton" or
"torch_sparse"); `refresh` rebuilds both compressed copies from the current weight after every projection.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kernels.compress import Compressed, compress
from kernels.spmm import sparse_linear


class SparseLinear(nn.Linear):
    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.mode = "dense"
        self.feature_major_out = False  # sparse modes: write y stored along tokens (for a sparse layer reading it next)
        self.fwd: Compressed | None = None  # rows = outputs, for Y = X·Wᵀ
        self.bwd: Compressed | None = None  # rows = inputs, for dX = dY·W

    @torch.no_grad()
    def refresh(self, mode: str, capacity: int, dtype: torch.dtype) -> None:
        """Switch to `mode`; for a sparse mode, rebuild the copies (values in `dtype`, the compute dtype)."""
        self.mode = mode
        if mode == "dense":
            return
        # In place once allocated (k only shrinks during the anneal), so compiled graphs stay valid.
        self.fwd = compress(self.weight, capacity, dtype, out=self.fwd)
        self.bwd = compress(self.weight.t(), capacity, dtype, out=self.bwd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dense":
            return super().forward(x)
        return sparse_linear(x.to(self.fwd.vals.dtype), self.weight, self.bias, self.fwd, self.bwd, self.mode, self.feature_major_out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}" + (", feature-major out" if self.feature_major_out else "")
