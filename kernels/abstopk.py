"""Fused AbsTopK: keep, per row, the k entries of largest |x| (ties: the lower index), zero the rest.

One program handles one row held in registers (d ≤ 8192; a single warp when d ≤ 1024), or, for activations stored
along tokens (feature-major, as the SpMM writes them for the next sparse layer), a few tokens whose features are
read and written in their own layout, with no transposing copy. The k-th largest magnitude
is found by a bitwise search over the magnitude bits of the float (15 for bf16/fp16, 31 for fp32): each bit costs
one in-register count, and no memory is touched between the load and the store. The reference is `torch.topk` +
`scatter` (sparse_lm.model.abstopk), which this matches exactly when magnitudes are distinct.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.runtime import feature_major, require_launchable


@triton.jit
def _abstopk_kernel(x_ptr, y_ptr, keep_ptr, n_rows, d, k, stride_t, stride_d, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                    MAG_BITS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < d)
    offs = rows.to(tl.int64)[:, None] * stride_t + cols.to(tl.int64)[None, :] * stride_d  # int64: tokens × d may pass 2³¹
    x = tl.load(x_ptr + offs, mask=inside, other=0.0)
    # Non-negative floats order like their bit patterns: the magnitude bits are a sortable integer key.
    if MAG_BITS == 15:
        key = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    else:
        key = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    key = tl.where(inside, key, -1)  # padding is never selected
    # Largest t with count(key >= t) >= k, i.e. the k-th largest key, built bit by bit from the top.
    thr = tl.zeros((ROWS,), tl.int32)
    for i in tl.static_range(MAG_BITS):
        cand = thr | (1 << (MAG_BITS - 1 - i))
        count = tl.sum((key >= cand[:, None]).to(tl.int32), axis=1)
        thr = tl.where(count >= k, cand, thr)
    above = key > thr[:, None]
    tied = key == thr[:, None]
    need = k - tl.sum(above.to(tl.int32), axis=1)
    keep = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=1) <= need[:, None]))
    tl.store(y_ptr + offs, tl.where(keep, x, 0.0), mask=inside)
    tl.store(keep_ptr + offs, keep, mask=inside)  # a bool tensor: no int8 copy to convert afterwards


def _launch(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    require_launchable(x, "AbsTopK")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"fused AbsTopK takes fp32, bf16 or fp16, got {x.dtype}")
    d = x.shape[-1]
    if d > 8192:
        raise ValueError(f"fused AbsTopK handles rows of up to 8192 entries, got {d}")
    x2, y, keep = _outputs(x)
    block_d = triton.next_power_of_2(d)
    if not x.is_cuda:  # the interpreter pays per program, not per warp: pack rows (same kernel, other constants)
        rows, warps = max(1, min(256, 16384 // block_d)), 4
    elif feature_major(x2):  # tokens side by side: 16 of them make a full 32-byte segment (bf16)
        rows, warps = max(1, min(16, 16384 // block_d)), 4 if block_d <= 1024 else 8
    else:
        # Up to 1024 entries, one warp per row: every count is a warp shuffle reduction, with no block barrier (35–73
        # per row otherwise) at the same instruction count; wider rows need more warps for registers.
        rows, warps = (1, 1) if block_d <= 1024 else (1, 4 if block_d <= 2048 else 8)
    mag_bits = 31 if x.dtype == torch.float32 else 15
    grid = (triton.cdiv(x2.shape[0], rows),)
    _abstopk_kernel[grid](x2, y, keep, x2.shape[0], d, k, x2.stride(0), x2.stride(1), ROWS=rows, BLOCK_D=block_d,
                          MAG_BITS=mag_bits, num_warps=warps)
    return y.view(x.shape), keep.view(x.shape)


def _outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x as [tokens, d], values out, mask out): token-major, or feature-major when x is stored along tokens."""
    x2 = x.reshape(-1, x.shape[-1])  # a view for both layouts
    if not feature_major(x2):
        x2 = x2.contiguous()
    return x2, torch.empty_like(x2), torch.empty_like(x2, dtype=torch.bool)  # empty_like keeps the layout


@torch.library.custom_op("sparse_lm::abstopk", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))  # as sparse_lm::spmm
def abstopk_op(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values with all but the top-k |x| per row zeroed, boolean mask of the kept entries)."""
    if k >= x.shape[-1]:  # nothing to drop: a copy, in the layout the kernel would have written
        x2, y, keep = _outputs(x)
        y.copy_(x2)
        keep.fill_(True)
        return y.view(x.shape), keep.view(x.shape)
    return _launch(x, k)


@abstopk_op.register_fake
def _(x, k):  # outputs are feature-major for a feature-major x, contiguous otherwise, as the real op makes them
    _, y, keep = _outputs(x)
    return y.view(x.shape), keep.view(x.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_y, _grad_mask):
    (keep,) = ctx.saved_tensors
    return grad_y * keep, None


abstopk_op.register_autograd(_backward, setup_context=_setup_context)


def abstopk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Drop-in for sparse_lm.model.abstopk: gradients flow through the kept entries only."""
    return abstopk_op(x, k)[0]
