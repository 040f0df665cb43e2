"""SpMM for weight-sparse linear layers: Y = X·Aᵀ with A compressed (kernels.compress), and the custom op with
autograd that uses it for Y = X·Wᵀ and dX = dY·W while dW = dYᵀ·X stays a dense matmul (exact regrowth).

Kernel: a program owns a tile of BT tokens × BR rows of A (rows taken in order of decreasing length) and walks
the rows' entries in lockstep (sliced-ELL over CSR): step j gathers X[t, col_j(r)] for the whole tile and
accumulates val_j(r)·X in fp32. Programs that share a token tile run next to each other, so the tile of X they
gather from stays in cache. X may be token-major (the model's layout) or feature-major (any strides); Y is
written token-major, or feature-major on request. Feature-major is the fast layout for both (docs/benchmarks.md):
each gathered index then fetches a contiguous run of tokens, and each row of Y is stored in full segments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.compress import Compressed
from kernels.runtime import feature_major, require_launchable


@triton.jit
def _spmm_kernel(x_ptr, y_ptr, row_ptr_ptr, cols_ptr, vals_ptr, order_ptr, T, N, stride_xt, stride_xk, stride_yt, stride_yn,
                 BT: tl.constexpr, BR: tl.constexpr, UNROLL: tl.constexpr):
    # One grid axis (the y axis is capped at 65535), row blocks fastest: neighbours share a token tile.
    n_row_blocks = tl.cdiv(N, BR)
    pid_r, pid_t = tl.program_id(0) % n_row_blocks, tl.program_id(0) // n_row_blocks
    r_idx = pid_r * BR + tl.arange(0, BR)
    r_in = r_idx < N
    rows = tl.load(order_ptr + r_idx, mask=r_in, other=0)
    start = tl.load(row_ptr_ptr + rows, mask=r_in, other=0)
    length = tl.load(row_ptr_ptr + rows + 1, mask=r_in, other=0) - start
    t = pid_t.to(tl.int64) * BT + tl.arange(0, BT)  # int64: tokens × features may pass 2³¹
    t_in = t < T
    acc = tl.zeros((BT, BR), dtype=tl.float32)
    for j0 in range(0, tl.max(length, axis=0), UNROLL):
        for u in tl.static_range(UNROLL):
            active = r_in & (j0 + u < length)
            c = tl.load(cols_ptr + start + j0 + u, mask=active, other=0).to(tl.int64)
            v = tl.load(vals_ptr + start + j0 + u, mask=active, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + t[:, None] * stride_xt + c[None, :] * stride_xk, mask=t_in[:, None] & active[None, :], other=0.0)
            acc += x.to(tl.float32) * v[None, :]
    out = y_ptr + t[:, None] * stride_yt + rows.to(tl.int64)[None, :] * stride_yn  # feature-major Y: rows × T passes 2³¹
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=t_in[:, None] & r_in[None, :])


def _new_y(x: torch.Tensor, n_out: int, feature_major_out: bool) -> torch.Tensor:
    if feature_major_out:
        return x.new_empty((n_out, x.shape[0])).t()
    return x.new_empty((x.shape[0], n_out))


# Exact strides: inductor must hand the kernel X in the layout it was traced with (left free, it lays out the fused
# element-wise op feeding dX token-major, undoing the feature-major MLP interior).
@torch.library.custom_op("sparse_lm::spmm", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def spmm(x: torch.Tensor, row_ptr: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, order: torch.Tensor, n_out: int,
         feature_major_out: bool = False) -> torch.Tensor:
    """Y [T, n_out] = X [T, K] · Aᵀ for the CSR matrix A [n_out, K] given by (row_ptr, cols, vals, order)."""
    require_launchable(x, "SpMM")
    T = x.shape[0]
    y = _new_y(x, n_out, feature_major_out)
    BT, BR = 64, 32
    grid = (triton.cdiv(n_out, BR) * triton.cdiv(T, BT),)
    _spmm_kernel[grid](x, y, row_ptr, cols, vals, order, T, n_out, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                       BT=BT, BR=BR, UNROLL=2, num_warps=4)
    return y


@spmm.register_fake
def _(x, row_ptr, cols, vals, order, n_out, feature_major_out=False):
    return _new_y(x, n_out, feature_major_out)


def matmul_t(x: torch.Tensor, a: Compressed, impl: str, feature_major_out: bool = False) -> torch.Tensor:
    """x [T, K] · Aᵀ with A [n, K] compressed: 'triton' (our kernel) or 'torch_sparse' (torch CSR, cuSPARSE on GPU,
    whose result is feature-major whatever is asked)."""
    if impl == "triton":
        return spmm(x, a.row_ptr, a.cols, a.vals, a.order, a.shape[0], feature_major_out)
    return (a.to_torch_sparse() @ x.t()).t()


# The layer's matmul as a custom op with its own autograd (not a torch.autograd.Function: under torch.compile those
# receive contiguous gradients, which would turn a feature-major dY token-major before dX's SpMM).
@torch.library.custom_op("sparse_lm::sparse_matmul", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def sparse_matmul(x: torch.Tensor, weight: torch.Tensor, row_ptr: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor,
                  order: torch.Tensor, t_row_ptr: torch.Tensor, t_cols: torch.Tensor, t_vals: torch.Tensor, t_order: torch.Tensor,
                  feature_major_out: bool) -> torch.Tensor:
    """x · Wᵀ through the compressed W (row_ptr, ...) with our SpMM; dX through the compressed Wᵀ (t_row_ptr, ...),
    in x's layout; dW = dyᵀ·x dense. `weight` is an input only so that it receives that gradient."""
    return spmm(x, row_ptr, cols, vals, order, weight.shape[0], feature_major_out)


@sparse_matmul.register_fake
def _(x, weight, row_ptr, cols, vals, order, t_row_ptr, t_cols, t_vals, t_order, feature_major_out):
    return _new_y(x, weight.shape[0], feature_major_out)


def _save(ctx, inputs, output):
    x, weight, *_, t_row_ptr, t_cols, t_vals, t_order, _fm = inputs
    ctx.save_for_backward(x, t_row_ptr, t_cols, t_vals, t_order)
    ctx.n_in, ctx.weight_dtype = weight.shape[1], weight.dtype


def _backward(ctx, dy):
    x, t_row_ptr, t_cols, t_vals, t_order = ctx.saved_tensors
    if not (dy.is_contiguous() or feature_major(dy)):  # the kernel takes any strides, but not broadcast ones
        dy = dy.contiguous()
    dx = spmm(dy, t_row_ptr, t_cols, t_vals, t_order, ctx.n_in, feature_major(x)) if ctx.needs_input_grad[0] else None
    dw = (dy.t() @ x).to(ctx.weight_dtype)  # dense: weights outside the pattern get their gradient (exact regrowth)
    return dx, dw, *[None] * 9


sparse_matmul.register_autograd(_backward, setup_context=_save)


class TorchSparseMatmul(torch.autograd.Function):
    """The same through torch CSR (cuSPARSE on a GPU), for comparison; eager only (its CSR tensors are built once
    per compressed copy, which a compiled graph cannot hold)."""

    @staticmethod
    def forward(ctx, x, weight, fwd: Compressed, bwd: Compressed):
        ctx.save_for_backward(x)
        ctx.bwd, ctx.weight_dtype = bwd, weight.dtype
        return matmul_t(x, fwd, "torch_sparse")

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dx = matmul_t(dy.contiguous(), ctx.bwd, "torch_sparse") if ctx.needs_input_grad[0] else None
        return dx, (dy.t() @ x).to(ctx.weight_dtype), None, None


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fwd: Compressed, bwd: Compressed, impl: str,
                  feature_major_out: bool = False):
    """F.linear over compressed copies (`fwd`: rows = outputs, `bwd`: rows = inputs), with impl 'triton' or
    'torch_sparse'; x may have any leading dims, and be stored along tokens (a view, no copy). y is written
    feature-major on request (torch_sparse always writes it so); dX takes x's layout, so a feature-major stretch of the
    model stays so backwards."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if impl == "triton":
        y = sparse_matmul(x2, weight, fwd.row_ptr, fwd.cols, fwd.vals, fwd.order, bwd.row_ptr, bwd.cols, bwd.vals, bwd.order,
                          feature_major_out)
    else:
        y = TorchSparseMatmul.apply(x2, weight, fwd, bwd)
    if bias is not None:
        y = y + bias.to(y.dtype)  # keeps y's layout; torch.compile fuses it into the next element-wise op
    return y.view(*lead, y.shape[-1])
