import math

import pytest
import torch

from sparse_lm.config import ModelConfig, PosEmb, SparsityConfig
from sparse_lm.model import GPT
from kernels.reference import projection_mask, topk_mask
from sparse_lm.sparsity import Sparsifier, sparse_params


def reference_mask(w: torch.Tensor, k: int, j: int = 0, axis: int | None = None) -> torch.Tensor:
    """Brute force: protected entries first, then larger |w|, then lower flat index."""
    rows, cols = w.shape
    score = w.abs().flatten().tolist()
    protected = set()
    if j and axis is not None:
        for n in range(w.shape[axis]):
            members = [r * cols + n for r in range(rows)] if axis == 1 else [n * cols + c for c in range(cols)]
            protected |= set(sorted(members, key=lambda i: (-score[i], i))[:j])
    order = sorted(range(rows * cols), key=lambda i: (i not in protected, -score[i], i))
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(rows, cols)


def test_topk_mask_keeps_exactly_k_largest():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g)
    for k in (0, 1, 100, 64 * 48 - 1, 64 * 48):
        m = topk_mask(x.abs(), k)
        assert int(m.sum()) == k
        if 0 < k < x.numel():
            assert x.abs()[m].min() >= x.abs()[~m].max()


def test_ties_go_to_the_lowest_index():
    x = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.0])
    assert topk_mask(x, 3).tolist() == [True, False, True, True, False, False]
    assert topk_mask(torch.ones(10), 4).nonzero().flatten().tolist() == [0, 1, 2, 3]
    rows = torch.tensor([[1.0, 1.0, 1.0], [5.0, 2.0, 2.0]])
    assert topk_mask(rows, 2, dim=1).tolist() == [[True, True, False], [True, True, False]]


@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("seed", range(5))
def test_projection_matches_brute_force_with_many_ties(axis, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-4, 5, (12, 10), generator=g).float()  # few distinct values: ties everywhere
    j = 3 if axis is not None else 0
    k = int(torch.randint(w.shape[axis] * j if axis is not None else 1, w.numel(), (1,), generator=g))
    assert torch.equal(projection_mask(w, k, j, axis), reference_mask(w, k, j, axis))


def test_every_neuron_keeps_its_j_largest_even_when_globally_small():
    w = torch.randn(16, 32)
    w[3] *= 1e-3  # row 3 (a neuron) would lose every entry to a plain global top-k
    w[:, 5] *= 1e-3
    k = 16 * 4 + 40
    rows = projection_mask(w, k, 4, neuron_axis=0)
    assert int(rows.sum()) == k and (rows.sum(dim=1) >= 4).all()
    assert torch.equal(rows[3], topk_mask(w[3].abs(), 4))  # the protected ones are that neuron's largest
    cols = projection_mask(w.T.contiguous(), k, 4, neuron_axis=1)  # same matrix seen as [in, out]
    assert int(cols.sum()) == k and (cols.sum(dim=0) >= 4).all()


def small_model(**kw) -> GPT:
    return GPT(ModelConfig(vocab_size=64, ctx_len=16, n_layer=2, d_model=32, d_mlp=64, **kw))


def test_which_parameters_are_sparse():
    model = small_model(pos_emb=PosEmb.learned)
    kinds = {sp.name: (sp.kind, sp.neuron_axis) for sp in sparse_params(model, SparsityConfig())}
    assert kinds["blocks.0.attn.c_attn.weight"] == ("hidden", 0)
    assert kinds["blocks.1.attn.c_proj.weight"] == ("hidden", 1)
    assert kinds["blocks.0.mlp.c_fc.weight"] == ("hidden", 0)
    assert kinds["blocks.0.mlp.c_proj.weight"] == ("hidden", 1)
    assert kinds["wte.weight"] == kinds["lm_head.weight"] == kinds["wpe.weight"] == ("embed", None)
    assert not any("norm" in n or "sink" in n or n == "bigram" or n.endswith("bias") for n in kinds)
    with_bias = {sp.name: sp.kind for sp in sparse_params(model, SparsityConfig(sparsify_biases=True))}
    assert with_bias["blocks.0.mlp.c_fc.bias"] == "bias" and "bigram" not in with_bias


@pytest.mark.parametrize("sparsify_biases", [False, True])
def test_sparsifier_projects_every_parameter_to_its_scheduled_k(sparsify_biases):
    model = small_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()  # biases start at zero; give them values to keep or drop
    cfg = SparsityConfig(hidden_density=0.25, embed_density=0.5, bias_density=0.5, sparsify_biases=sparsify_biases)
    sp = Sparsifier(model, cfg, total_steps=100)
    plan = sp.plan(100)
    sp.apply(plan)
    for p in sp.params:
        target = {"hidden": 0.25, "embed": 0.5, "bias": 0.5}[p.kind]
        assert int((p.param != 0).sum()) == math.floor(target * p.param.numel()) == plan.k[p.name], p.name
        if p.neuron_axis is not None:
            assert ((p.param != 0).sum(dim=1 - p.neuron_axis) >= 4).all()
    bias = model.blocks[0].mlp.c_fc.bias
    assert (int((bias != 0).sum()) < bias.numel()) == sparsify_biases


def test_dense_phase_and_disabled_sparsity_leave_weights_alone():
    model = small_model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    for cfg, step in ((SparsityConfig(hidden_density=0.25), 1), (SparsityConfig(enabled=False), 100)):  # 1: before the anneal
        sparsifier = Sparsifier(model, cfg, total_steps=100)
        sparsifier.apply(sparsifier.plan(step))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_min_per_neuron_that_cannot_fit_fails_before_training():
    with pytest.raises(ValueError, match=r"min_per_neuron=4 needs .* blocks\.0\.attn\.c_attn\.weight .*hidden_density"):
        Sparsifier(small_model(), SparsityConfig(hidden_density=1 / 16), total_steps=10)


def test_bad_density_is_named():
    with pytest.raises(ValueError, match="sparsity.embed_density=0"):
        Sparsifier(small_model(), SparsityConfig(embed_density=0.0), total_steps=10)
