"""Every Triton kernel against its torch reference (on CPU under TRITON_INTERPRET=1, set in conftest.py).

Shapes are small and deliberately not multiples of the block sizes; values are checked in fp32 and fp16 (the
interpreter gets bf16 dots and atomics wrong, see docs/method.md §4), gradients in fp32.
"""

import pytest
import torch
import torch.nn.functional as F

from kernels.abstopk import abstopk, abstopk_op
from kernels.compress import compress
from kernels.select import select_topk
from kernels.spmm import sparse_linear, spmm
from sparse_lm.model import abstopk as abstopk_reference
from kernels.reference import projection_mask, protected_mask
from tests.conftest import DEVICE


def sparse_matrix(rows, cols, density, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    return (w * projection_mask(w, int(density * w.numel()))).to(dtype).to(DEVICE)


# ---------------------------------------------------------------- AbsTopK


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d, k", [(64, 16), (100, 25), (33, 1), (130, 129)])
def test_abstopk_matches_topk_and_scatter(dtype, d, k):
    # Distinct magnitudes in every row (exact in fp16), so the reference's choice is unambiguous.
    g = torch.Generator().manual_seed(d)
    magnitudes = torch.stack([torch.randperm(d, generator=g) + 1 for _ in range(15)]).view(3, 5, d) / 128
    x = (magnitudes * (torch.randint(0, 2, (3, 5, d), generator=g) * 2 - 1)).to(dtype).to(DEVICE)
    y = abstopk(x, k)
    assert torch.equal(y, abstopk_reference(x, k))
    assert ((y != 0).sum(-1) == k).all()


def test_abstopk_kernel_as_launched_on_a_gpu_one_row_per_warp():
    """On a CPU the launcher packs rows (the interpreter pays per program); the GPU launch is one row per program."""
    from kernels.abstopk import _abstopk_kernel

    x = torch.randn(5, 100, device=DEVICE)
    y, keep = torch.empty_like(x), torch.empty(x.shape, dtype=torch.bool, device=DEVICE)
    _abstopk_kernel[(5,)](x, y, keep, 5, 100, 17, 100, 1, ROWS=1, BLOCK_D=128, MAG_BITS=31, num_warps=1)
    assert torch.equal(y, abstopk_reference(x, 17)) and torch.equal(keep, y != 0)
    # Stored along tokens (the feature-major MLP interior): 16 tokens per program, read and written in that layout.
    x = torch.randn(100, 40, device=DEVICE).t()
    y, keep = torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)
    _abstopk_kernel[(3,)](x, y, keep, 40, 100, 17, 1, 40, ROWS=16, BLOCK_D=128, MAG_BITS=31, num_warps=4)
    assert y.stride() == (1, 40) and torch.equal(y, abstopk_reference(x, 17)) and torch.equal(keep, y != 0)


def test_abstopk_ties_go_to_the_lowest_index_and_k_at_least_d_is_identity():
    x = torch.tensor([[1.0, -1.0, 1.0, 0.5, -1.0, 0.2], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], device=DEVICE)
    _, keep = abstopk_op(x, 2)
    assert keep.tolist() == [[True, True, False, False, False, False], [True, True, False, False, False, False]]
    assert torch.equal(abstopk(x, 6), x) and torch.equal(abstopk(x, 9), x)
    with pytest.raises(ValueError, match="up to 8192"):
        abstopk(torch.randn(1, 8193, device=DEVICE), 4)
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        abstopk(torch.randn(2, 8, device=DEVICE, dtype=torch.float64), 2)


def test_abstopk_gradient_flows_through_kept_entries_only():
    x = torch.randn(4, 7, 40, device=DEVICE, requires_grad=True)
    y = abstopk(x, 9)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    assert torch.equal(x.grad, g * (y != 0))


# ---------------------------------------------------------------- compressed copies


@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 1.0])
def test_compressed_copies_hold_the_matrix_in_both_orientations(density):
    w = sparse_matrix(37, 70, density)
    w[5] = 0.0  # an empty row
    w[9] = torch.arange(1, 71, device=DEVICE)  # a full row
    k = int((w != 0).sum())
    for a in (w, w.t()):
        c = compress(a, capacity=k + 3)
        assert torch.equal(c.to_dense(), a)
        lengths = (c.row_ptr[1:] - c.row_ptr[:-1])[c.order.long()]
        assert (lengths[:-1] >= lengths[1:]).all()  # rows by decreasing length
        assert c.cols.dtype == torch.int16


def test_compress_kernel_and_torch_path_agree(monkeypatch):
    import kernels.compress as mod

    w = sparse_matrix(29, 45, 0.2)
    k = int((w != 0).sum())
    fast = compress(w.t(), k, torch.float16)
    monkeypatch.setattr(mod, "launchable", lambda t: False)  # the torch path
    slow = compress(w.t(), k, torch.float16)
    for name in ("row_ptr", "cols", "vals", "order"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_an_undersized_capacity_truncates_instead_of_reading_past_the_buffers(monkeypatch, path):
    """row_ptr used to count every nonzero while only `capacity` were written, so the SpMM read past the buffers."""
    import kernels.compress as mod

    if path == "torch":
        monkeypatch.setattr(mod, "launchable", lambda t: False)
    w = sparse_matrix(23, 40, 0.3)
    nnz = int((w != 0).sum())
    cap = nnz // 2
    c = compress(w, capacity=cap)
    assert int(c.row_ptr[-1]) == cap and (c.row_ptr[1:] >= c.row_ptr[:-1]).all()
    first = torch.zeros_like(w).flatten()
    where = (w != 0).flatten().nonzero().flatten()[:cap]  # the first `cap` nonzeros in row-major order
    first[where] = w.flatten()[where]
    assert torch.equal(c.to_dense(), first.view_as(w))
    lengths = (c.row_ptr[1:] - c.row_ptr[:-1])[c.order.long()]
    assert (lengths[:-1] >= lengths[1:]).all()
    x = torch.randn(9, 40, device=DEVICE)
    y = spmm(x, c.row_ptr, c.cols, c.vals, c.order, 23)
    torch.testing.assert_close(y, x @ first.view_as(w).t(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- SpMM and the sparse linear layer


@pytest.mark.parametrize("impl", ["triton", "torch_sparse"])
@pytest.mark.parametrize("density", [0.0, 0.04, 0.5, 1.0])
def test_sparse_linear_matches_dense_values_and_gradients(impl, density):
    T, K, N = 70, 45, 33  # not multiples of the kernel's tiles
    w = sparse_matrix(N, K, density, seed=1)
    w[3] = 0.0
    k = max(1, int((w != 0).sum()))
    fwd, bwd = compress(w, k), compress(w.t(), k)
    x = torch.randn(2, T // 2, K, device=DEVICE, requires_grad=True)
    weight = w.clone().requires_grad_(True)
    bias = torch.randn(N, device=DEVICE, requires_grad=True)
    y = sparse_linear(x, weight, bias, fwd, bwd, impl)
    ref_x, ref_w, ref_b = (t.detach().clone().requires_grad_(True) for t in (x, w, bias))
    ref = F.linear(ref_x, ref_w, ref_b)
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, ref_w.grad)  # dense dW: zeroed weights get gradient too
    torch.testing.assert_close(bias.grad, ref_b.grad)
    if density < 1.0:
        assert (weight.grad[w == 0] != 0).any()


def test_spmm_in_fp16_and_on_feature_major_input():
    w = sparse_matrix(40, 24, 0.1, dtype=torch.float16)
    c = compress(w, int((w != 0).sum()))
    x = torch.randn(24, 50, dtype=torch.float16, device=DEVICE).t()  # strides (1, 50): feature-major
    y = spmm(x, c.row_ptr, c.cols, c.vals, c.order, 40)
    torch.testing.assert_close(y.float(), x.float() @ w.float().t(), rtol=1e-2, atol=1e-2)
    y_fm = spmm(x, c.row_ptr, c.cols, c.vals, c.order, 40, True)  # written along tokens as well
    assert y_fm.stride() == (1, 50) and torch.equal(y_fm, y)


def test_a_feature_major_mlp_interior_matches_dense_and_keeps_its_layout_backwards():
    """c_fc writes along tokens, GELU and the fused AbsTopK keep that layout, c_proj reads it; the gradients come
    back in the same layouts (dX takes X's), and every value and gradient equals the dense token-major reference."""
    w1, w2 = sparse_matrix(48, 20, 0.2, seed=4), sparse_matrix(20, 48, 0.2, seed=5)
    c1 = [compress(a, int((a != 0).sum())) for a in (w1, w1.t())]
    c2 = [compress(a, int((a != 0).sum())) for a in (w2, w2.t())]
    x = torch.randn(3, 7, 20, device=DEVICE, requires_grad=True)
    seen = []

    def mlp(x, w1, w2, sparse):
        h = sparse_linear(x, w1, None, *c1, "triton", True) if sparse else F.linear(x, w1)
        h = (abstopk if sparse else abstopk_reference)(F.gelu(h), 12)
        if sparse:
            seen.append(h.reshape(21, 48).stride())
            h.register_hook(lambda g: seen.append(g.reshape(21, 48).stride()))
        return sparse_linear(h, w2, None, *c2, "triton") if sparse else F.linear(h, w2)

    a = [t.detach().clone().requires_grad_(True) for t in (x, w1, w2)]
    b = [t.detach().clone().requires_grad_(True) for t in (x, w1, w2)]
    y, ref = mlp(*a, True), mlp(*b, False)
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous() and seen == [(1, 21), (1, 21)]  # c_proj writes token-major for the residual stream
    for got, want in zip(a, b):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- top-k selection


@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("ties", [False, True])
def test_radix_select_keeps_the_reference_survivors(axis, ties):
    g = torch.Generator().manual_seed(7)
    w = torch.randint(-3, 4, (23, 50), generator=g).float() * 0.25 if ties else torch.randn(23, 50, generator=g)
    w = w.to(DEVICE)
    j = 0 if axis is None else 3
    lowest = w.shape[axis] * j if axis is not None else 1
    for k in (lowest, (lowest + w.numel()) // 3, w.numel() - 1):
        ref = projection_mask(w, k, j, axis)
        got, thr = select_topk(w, k, j, axis)
        assert torch.equal(got, ref) and int(got.sum()) == k
        again, _ = select_topk(w, k, j, axis, warm=thr)  # warm start at the right threshold
        assert torch.equal(again, ref)
        stale, _ = select_topk(w, k, j, axis, warm=torch.tensor([0x3F800000], dtype=torch.int32, device=DEVICE))
        assert torch.equal(stale, ref)  # a warm start in the wrong place falls back to the full search


@pytest.mark.parametrize("axis", [0, 1])
def test_fused_j_rule_walks_fans_longer_than_a_tile(axis):
    # Fans of 150 (rows) and 70 (columns) take 3 and 2 tiles of 64 in the protection pass: the j-th largest and the
    # tie ranks must carry across tiles. Few distinct values, and one neuron all equal (its first j by index).
    g = torch.Generator().manual_seed(3)
    w = (torch.randint(-2, 3, (70, 150), generator=g).float() * 0.5).to(DEVICE)
    w[5, :] = 1.0
    w[:, 7] = 1.0
    k = 70 * 150 // 8
    got, _ = select_topk(w, k, 6, axis)
    assert torch.equal(got, projection_mask(w, k, 6, axis))
    assert (got & protected_mask(w, 6, axis)).sum() == protected_mask(w, 6, axis).sum()  # every protected entry kept
    small_k = w.shape[axis] * 6  # k = the protected count: exactly the j rule's entries survive
    assert torch.equal(select_topk(w, small_k, 6, axis)[0], protected_mask(w, 6, axis))


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_radix_select_with_the_gpu_launch_constants(monkeypatch, axis):
    """On a CPU the passes run as one program over big blocks; a GPU-like launch (many programs, each walking several
    blocks; tie ranks carried across blocks; many protection tiles and fan chunks, several per program) must give the
    same survivors. Small blocks and at most 3 programs, so that each walks several blocks and tiles."""
    import kernels.select as mod

    monkeypatch.setattr(mod, "launch_sizes", lambda cuda: {"block": 256, "programs": 3, "protect": (8, 16, 4)})
    g = torch.Generator().manual_seed(11)
    w = (torch.randint(-2, 3, (40, 30), generator=g).float() * 0.5).to(DEVICE)  # 1,200 entries: 5 blocks, ties everywhere
    j = 0 if axis is None else 3
    for k in (w.numel() // 5, w.numel() // 2):
        got, thr = select_topk(w, k, j, axis)
        assert torch.equal(got, projection_mask(w, k, j, axis))
        assert torch.equal(select_topk(w, k, j, axis, warm=thr)[0], projection_mask(w, k, j, axis))


def test_radix_select_edges():
    w = torch.randn(9, 11, device=DEVICE)
    assert not select_topk(w, 0)[0].any() and select_topk(w, w.numel())[0].all()
    z = torch.zeros(5, 8, device=DEVICE)
    z[2, 3] = 1.0
    assert select_topk(z, 4)[0].flatten().nonzero().flatten().tolist() == [0, 1, 2, 19]  # 1.0, then zeros by index


def test_warm_start_skips_the_full_passes_when_the_threshold_barely_moved():
    import kernels.select as mod

    w = torch.randn(40, 40, device=DEVICE)
    _, thr = select_topk(w, 300)
    moved = w + 1e-5 * torch.randn_like(w)
    state = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    state[1], state[0:1], state[2] = 300, thr & mod._hi_mask(8), 16
    hist = torch.zeros(512, dtype=torch.int32, device=DEVICE)
    flat = moved.view(-1)
    mod._radix_pass[(2,)](flat, flat, flat.numel(), state, hist, SHIFT=8, HI_MASK=mod._hi_mask(8), LEVEL=16, WARM=True, HAS_PROT=False, BLOCK=1024)
    mod._radix_scan[(1,)](state, hist, 300, SHIFT=8, LEVEL=16, WARM=True)
    assert int(state[2]) == 24  # 24 bits fixed by one pass: only the last digit pass is left


# ---------------------------------------------------------------- custom ops and torch.compile


def test_custom_ops_pass_opcheck():
    x = torch.randn(6, 20, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.sparse_lm.abstopk.default, (x, 5))
    torch.library.opcheck(torch.ops.sparse_lm.abstopk.default, (torch.randn(20, 6, device=DEVICE).t(), 5))  # strided
    torch.library.opcheck(torch.ops.sparse_lm.abstopk.default, (x.detach().t(), 9))  # k ≥ d: the copy path
    w = sparse_matrix(12, 20, 0.2)
    c = compress(w, int((w != 0).sum()))
    torch.library.opcheck(torch.ops.sparse_lm.spmm.default, (x.detach(), c.row_ptr, c.cols, c.vals, c.order, 12))
    # Stored along tokens, in and out: the fake implementations must give the real strides.
    fm = torch.randn(20, 6, device=DEVICE).t()
    torch.library.opcheck(torch.ops.sparse_lm.abstopk.default, (fm.requires_grad_(True), 5))
    torch.library.opcheck(torch.ops.sparse_lm.abstopk.default, (fm, 6))  # k ≥ d keeps the layout too
    assert abstopk(fm, 6).stride() == fm.stride()
    torch.library.opcheck(torch.ops.sparse_lm.spmm.default, (fm.detach(), c.row_ptr, c.cols, c.vals, c.order, 12, True))
    ct = compress(w.t(), int((w != 0).sum()))
    for inp, out_fm in ((x.detach(), False), (fm.detach(), True)):  # the layer's op, its autograd included
        torch.library.opcheck(torch.ops.sparse_lm.sparse_matmul.default,
                              (inp.clone().requires_grad_(True), w.clone().requires_grad_(True), c.row_ptr, c.cols, c.vals, c.order,
                               ct.row_ptr, ct.cols, ct.vals, ct.order, out_fm))


def test_a_compiled_backward_keeps_the_feature_major_gradient(monkeypatch):
    """Under torch.compile an autograd.Function gets contiguous gradients; the layer's custom op must not, or c_fc's
    dX would gather a token-major dY after a copy. The SpMM calls of a compiled MLP step, in order, read: x, the
    hidden activations (feature-major), dY of c_proj, and dY of c_fc, which must still be feature-major."""
    import kernels.spmm as mod

    seen = []
    monkeypatch.setattr(mod, "require_launchable", lambda t, what: seen.append(t.stride()))
    w1, w2 = sparse_matrix(48, 20, 0.2, seed=4).requires_grad_(True), sparse_matrix(20, 48, 0.2, seed=5).requires_grad_(True)
    c1 = [compress(a, int((a != 0).sum())) for a in (w1.detach(), w1.detach().t())]
    c2 = [compress(a, int((a != 0).sum())) for a in (w2.detach(), w2.detach().t())]

    def mlp(x):
        h = abstopk(F.gelu(sparse_linear(x, w1, None, *c1, "triton", True)), 12)
        return sparse_linear(h, w2, None, *c2, "triton")

    x = torch.randn(3, 7, 20, device=DEVICE, requires_grad=True)
    torch.compile(mlp, backend="aot_eager", fullgraph=True)(x).sum().backward()
    assert seen == [(20, 1), (1, 21), (20, 1), (1, 21)], seen


def test_torch_compile_traces_the_kernels_without_graph_breaks():
    w = sparse_matrix(16, 24, 0.25)
    fwd, bwd = compress(w, 96), compress(w.t(), 96)
    weight = w.clone().requires_grad_(True)

    def layer(x):
        return abstopk(sparse_linear(x, weight, None, fwd, bwd, "triton"), 4)

    x = torch.randn(10, 24, device=DEVICE)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
