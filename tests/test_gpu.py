"""The CUDA path (bf16 autocast, fused Adam, MFU logging); skipped on machines without a GPU."""

import math

import pytest

from sparse_lm.inspect import inspect_checkpoint
from sparse_lm.metrics import read_metrics
from tests.conftest import run_train

pytestmark = pytest.mark.gpu


def test_a_short_bf16_run_on_cuda(corpus, tmp_path):
    run_dir = tmp_path / "cuda"
    run_train(run_dir, corpus, "train.device=cuda", "train.precision=bf16", "train.max_steps=8", "train.ckpt_interval=8")
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 8 and all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    _, params = inspect_checkpoint(run_dir)
    assert all(p.ok for p in params)


def test_kernels_on_cuda_agree_with_their_references():
    import torch
    import torch.nn.functional as F

    from kernels.abstopk import abstopk
    from kernels.crossover import random_sparse_weight as sparse_weight
    from kernels.compress import compress
    from kernels.select import select_topk
    from kernels.spmm import sparse_linear
    from sparse_lm.model import abstopk as abstopk_reference
    from kernels.reference import projection_mask

    w = sparse_weight((1024, 768), 0.01, "cuda")
    k = int((w != 0).sum())
    x = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = w.clone().requires_grad_(True)
    y = sparse_linear(x, weight, None, compress(w, k, torch.bfloat16), compress(w.t(), k, torch.bfloat16), "triton")
    ref = F.linear(x.float(), w)
    assert (y.float() - ref).norm() / ref.norm() < 1e-2
    dy = torch.randn_like(y)  # random, so a row or column mix-up in dX shows (ones would hide it)
    y.backward(dy)
    ref_dx = dy.float() @ w
    assert (x.grad.float() - ref_dx).norm() / ref_dx.norm() < 1e-2

    big = torch.randn(2048, 2048, device="cuda")
    kk = 2048 * 2048 // 64
    for axis in (0, 1):  # the j rule along rows and along columns, fused into the first pass
        assert torch.equal(select_topk(big, kk, 4, axis)[0], projection_mask(big, kk, 4, axis))

    a = torch.randn(8192, 4096, device="cuda")
    assert torch.equal(abstopk(a, 1024), abstopk_reference(a, 1024))
    fm = a[:, :1024].t().contiguous().t()  # stored along tokens, as the feature-major MLP interior has it
    assert torch.equal(abstopk(fm, 256), abstopk_reference(fm, 256))


def test_selection_replays_from_a_cuda_graph():
    """Every launch of select_topk is unconditional and reads its state on the device: a captured graph replayed on
    new weights (written in place) must keep the reference survivors, for both neuron axes and a warm start."""
    import torch

    from kernels.reference import projection_mask
    from kernels.select import select_topk

    w = torch.randn(1024, 768, device="cuda")
    k = w.numel() // 64
    for axis in (0, 1):
        _, thr = select_topk(w, k, 4, axis)  # compile every kernel before capture
        select_topk(w, k, 4, axis, warm=thr)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            mask, _ = select_topk(w, k, 4, axis, warm=thr)
        for seed in range(3):
            w.copy_(torch.randn(w.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
            graph.replay()
            assert torch.equal(mask, projection_mask(w, k, 4, axis)), (axis, seed)


def test_a_short_run_with_every_kernel_on_cuda_tracks_the_reference(corpus, tmp_path):
    common = ["train.device=cuda", "train.max_steps=20", "train.ckpt_interval=20", "sparsity.hidden_density=0.125"]
    run_train(tmp_path / "dense", corpus, *common)
    run_train(tmp_path / "fast", corpus, *common, "kernels=fast", "kernels.backend=triton")
    ref, fast = ([r["loss"] for r in read_metrics(tmp_path / n / "metrics.jsonl") if "loss" in r] for n in ("dense", "fast"))
    assert len(fast) == len(ref) == 20 and max(abs(a - b) for a, b in zip(ref, fast)) < 0.05
