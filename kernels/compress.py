"""Compressed copies of a sparse weight matrix, rebuilt after every projection without a host sync.

A `Compressed` matrix A [rows, cols] is CSR: `row_ptr` [rows + 1] (int32), `cols` and `vals` of fixed capacity
(the k of the schedule, known on the host, so no nonzero count has to be read back), and `order`: the rows sorted
by decreasing length, so that the SpMM kernel gives each program rows of similar work.

For a linear layer with weight W [out, in] two copies are kept: A = W (rows = outputs) for Y = X·Wᵀ, and A = Wᵀ
(rows = inputs) for dX = dY·W. Within a row, entries are in increasing column order (the reference tie order).
On the GPU (or under the Triton interpreter) one kernel compacts each orientation in a single pass over W;
elsewhere the same arrays come from torch ops.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.runtime import launchable


@dataclass
class Compressed:
    row_ptr: torch.Tensor  # [rows + 1] int32
    cols: torch.Tensor  # [capacity] int16 (or int32 if cols > 32767)
    vals: torch.Tensor  # [capacity]
    order: torch.Tensor  # [rows] int32, rows by decreasing length
    shape: tuple[int, int]
    _torch_csr: torch.Tensor | None = None

    def to_dense(self) -> torch.Tensor:
        return self.to_torch_sparse().to_dense()

    def to_torch_sparse(self) -> torch.Tensor:
        """The same matrix as a torch sparse CSR tensor (built once: reading nnz back costs a host sync)."""
        if self._torch_csr is None:
            nnz = int(self.row_ptr[-1])
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
                self._torch_csr = torch.sparse_csr_tensor(
                    self.row_ptr, self.cols[:nnz].int(), self.vals[:nnz], self.shape, check_invariants=False
                )
        return self._torch_csr


def index_dtype(n_cols: int) -> torch.dtype:
    return torch.int16 if n_cols <= 32767 else torch.int32


@triton.jit
def _compact_kernel(w_ptr, row_ptr_ptr, cols_ptr, vals_ptr, capacity, n_out_rows, n_out_cols, stride_r, stride_c,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Compact BLOCK_R output rows of A = W (stride_r = row stride of A), walking the columns of A in tiles.

    Each program owns whole rows, so the position of an entry is row_ptr[row] + (its rank in the row).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < n_out_rows
    base = tl.load(row_ptr_ptr + rows, mask=row_in, other=0)
    for c0 in range(0, n_out_cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        inside = row_in[:, None] & (c[None, :] < n_out_cols)
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride_r + c[None, :] * stride_c, mask=inside, other=0.0)
        nz = (w != 0) & inside
        rank = tl.cumsum(nz.to(tl.int32), axis=1)
        dest = base[:, None] + rank - 1
        ok = nz & (dest < capacity)  # never write past the buffer, even if a caller under-sized it
        tl.store(cols_ptr + dest, tl.broadcast_to(c[None, :], (BLOCK_R, BLOCK_C)).to(cols_ptr.dtype.element_ty), mask=ok)
        tl.store(vals_ptr + dest, w.to(vals_ptr.dtype.element_ty), mask=ok)
        base += tl.sum(nz.to(tl.int32), axis=1)


def compress(a: torch.Tensor, capacity: int, dtype: torch.dtype | None = None, out: Compressed | None = None) -> Compressed:
    """CSR copy of the 2-D tensor `a` (any strides: pass W.t() for the input-major copy).

    `capacity` should be at least the number of nonzeros (the projection guarantees nnz ≤ k); if it is not, the copy
    holds the first `capacity` nonzeros in row-major order and no row points past them. With `out` (a copy of
    the same shape, dtype and at least this capacity) the arrays are rewritten in place: the same tensors every
    step, which keeps torch.compile from recompiling.
    """
    rows, cols = a.shape
    dtype = dtype or a.dtype
    capacity = max(capacity, 1)
    if out is None or out.shape != (rows, cols) or out.vals.dtype != dtype or out.vals.numel() < capacity:
        out = Compressed(
            torch.zeros(rows + 1, dtype=torch.int32, device=a.device),
            torch.zeros(capacity, dtype=index_dtype(cols), device=a.device),
            torch.zeros(capacity, dtype=dtype, device=a.device),
            torch.zeros(rows, dtype=torch.int32, device=a.device),
            (rows, cols),
        )
    out._torch_csr = None
    capacity = out.vals.numel()
    counts = (a != 0).sum(dim=1, dtype=torch.int32)
    torch.cumsum(counts, 0, out=out.row_ptr[1:])
    # More nonzeros than capacity (a caller's bug: the projection keeps nnz ≤ k) must not make readers run past the
    # buffers: the entries beyond capacity are not written, and row_ptr is clipped so that no row claims them.
    out.row_ptr.clamp_(max=capacity)
    out.order.copy_(torch.argsort(out.row_ptr[1:] - out.row_ptr[:-1], descending=True, stable=True))
    if launchable(a):
        block_c = min(256, triton.next_power_of_2(cols))
        grid = (triton.cdiv(rows, 16),)
        _compact_kernel[grid](a, out.row_ptr, out.cols, out.vals, capacity, rows, cols, a.stride(0), a.stride(1), BLOCK_R=16, BLOCK_C=block_c)
        return out
    # torch path: flat positions of the nonzeros in row-major order, scattered into a fixed-size buffer.
    flat = (a != 0).flatten()
    dest = torch.where(flat, flat.cumsum(0) - 1, capacity).clamp_(max=capacity)
    idx = torch.zeros(capacity + 1, dtype=torch.int64, device=a.device)
    idx.scatter_(0, dest, torch.arange(flat.numel(), device=a.device))
    idx = idx[:capacity]
    out.cols.copy_(idx % cols)
    out.vals.copy_(a.flatten()[idx])
    return out
