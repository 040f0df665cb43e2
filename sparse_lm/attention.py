"""Causal attention with a per-head sink logit (docs/method.md §1), computed two ways with the same result.

    y_i = Σ_{j ≤ i} p_ij v_j,   p_ij = exp(s_ij) / (exp(sink_h) + Σ_{j' ≤ i} exp(s_ij')),   s_ij = q_i · k_j / √d

The sink is an extra key/value slot whose value is zero: it only adds exp(sink_h) to the denominator, letting a head
attend "nowhere". On GPUs `F.scaled_dot_product_attention` with an additive mask runs a fused kernel. On CPUs that
call takes PyTorch's generic path (a zero key/value concatenated, a float mask, a softmax that guards fully masked
rows), and at the tiny preset's shape it cost a fifth of a training step; `SinkAttention` computes the same
probabilities with a handful of in-place ops and writes its backward out (docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def attention_with_sink(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """q, k, v: [B, H, T, D]; sink: [H]. Returns [B, H, T, D]."""
    if q.device.type == "cpu":
        return SinkAttention.apply(q, k, v, sink)
    return masked_sdpa(q, k, v, sink)


def masked_sdpa(q, k, v, sink):
    """The slot as key/value position 0; an additive float mask gives it the logit sink[h] (q·0 = 0) and applies the
    causal mask to the real positions. Gradients reach `sink` through the mask."""
    B, H, T, D = q.shape
    zero = q.new_zeros(B, H, 1, D)
    k, v = torch.cat([zero, k], dim=2), torch.cat([zero, v], dim=2)
    causal = torch.full((T, T), float("-inf"), device=q.device).triu(1)
    mask = torch.cat([sink.view(H, 1, 1).expand(H, T, 1), causal.expand(H, T, T)], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))


class SinkAttention(torch.autograd.Function):
    """The explicit computation, with the generic path's forward arithmetic (equal to it at the model's layout in the
    tests, to fp32 rounding in general) and half its time: scores for the sink and the T keys are written into one [B, H, T, 1 + T] tensor, softmaxed once,
    and the probabilities kept for the backward (as the generic path keeps its attention weights)."""

    @staticmethod
    def forward(ctx, q, k, v, sink):
        B, H, T, D = q.shape
        scale = D**-0.5
        # The model passes heads as transposed views; batched matmuls run faster on contiguous copies (small).
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        scores = q.new_empty(B, H, T, 1 + T)
        scores[..., 0] = sink.view(1, H, 1)
        causal = torch.full((T, T), float("-inf"), device=q.device).triu_(1)
        torch.add(torch.matmul(q * scale, k.transpose(-1, -2)), causal, out=scores[..., 1:])
        p = scores.softmax(-1)
        y = torch.matmul(p[..., 1:], v)
        ctx.save_for_backward(q, k, v, p, y)
        ctx.scale, ctx.sink_dtype = scale, sink.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        q, k, v, p, y = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        p_sink, p = p[..., :1], p[..., 1:]
        grad_v = torch.matmul(p.transpose(-1, -2), grad_y)
        # Softmax backward: grad_s = p (grad_p − Σ_j p_j grad_p_j), and the sum is grad_y · y because the sink's
        # value is zero (its grad_p is 0).
        expected = (grad_y * y).sum(-1, keepdim=True)
        grad_s = torch.matmul(grad_y, v.transpose(-1, -2)).sub_(expected).mul_(p)
        grad_q = torch.matmul(grad_s, k).mul_(ctx.scale)
        grad_k = torch.matmul(grad_s.transpose(-1, -2), q).mul_(ctx.scale)
        grad_sink = (p_sink * expected).sum((0, 2, 3)).neg_().to(ctx.sink_dtype)
        return grad_q, grad_k, grad_v, grad_sink
