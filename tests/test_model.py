import math

import pytest
import torch

from sparse_lm.config import Activation, ModelConfig, Norm, PosEmb
from sparse_lm.hooks import mean_ablate, patch, record
from sparse_lm.attention import SinkAttention, attention_with_sink, masked_sdpa
from sparse_lm.model import GPT, abstopk

CFG = dict(vocab_size=97, ctx_len=24, n_layer=3, d_model=64, d_mlp=128)


def model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**CFG, **kw}))


def tokens(B=3, T=24, seed=1):
    return torch.randint(0, CFG["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def test_abstopk_keeps_exactly_k_largest_and_routes_gradient_through_them_only():
    x = torch.randn(5, 7, 40, requires_grad=True)
    y = abstopk(x, 10)
    kept = y != 0
    assert (kept.sum(-1) == 10).all()
    assert torch.equal(y[kept], x[kept])
    smallest_kept = x.abs().masked_fill(~kept, float("inf")).amin(-1)
    largest_dropped = x.abs().masked_fill(kept, -1).amax(-1)
    assert (smallest_kept > largest_dropped).all()
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    assert torch.equal(x.grad, upstream * kept)


def test_site_names_are_stable():
    m = model()
    per_layer = ["resid_pre", "attn.in", "attn.q", "attn.k", "attn.v", "attn.out", "resid_mid", "mlp.in", "mlp.neuron", "mlp.out", "resid_post"]
    assert sorted(m.sites) == sorted(f"{i}.{s}" for i in range(3) for s in per_layer)
    assert m.site("2.mlp.neuron") is m.blocks[2].mlp.sites["neuron"]
    with pytest.raises(KeyError, match="no activation site"):
        m.site("3.attn.q")


def test_abstopk_sites_keep_floor_afrac_dim_per_token_and_the_residual_is_dense():
    m = model(afrac=0.3)
    names = [f"1.{s}" for s in ("attn.in", "attn.q", "attn.k", "attn.v", "attn.out", "mlp.in", "mlp.neuron", "mlp.out", "resid_mid")]
    with record(m, names) as acts:
        m(tokens())
    for name in names[:-1]:
        dim = acts[name].shape[-1]
        assert ((acts[name] != 0).sum(-1) == math.floor(0.3 * dim)).all(), name
    assert (acts["1.resid_mid"] != 0).all()


def test_each_topk_site_can_be_switched_off():
    m = model(topk_sites=["attn_q", "mlp_neuron"])
    with record(m, ["0.attn.q", "0.attn.k", "0.mlp.neuron"]) as acts:
        m(tokens())
    assert ((acts["0.attn.q"] != 0).sum(-1) == 16).all() and ((acts["0.mlp.neuron"] != 0).sum(-1) == 32).all()
    assert (acts["0.attn.k"] != 0).float().mean() > 0.99
    with pytest.raises(ValueError, match="model.topk_sites: unknown"):
        model(topk_sites=["attn_x"])


@pytest.mark.parametrize("opts", [{}, {"attn_sink": False}, {"norm": Norm.layer, "activation": Activation.relu, "pos_emb": PosEmb.learned, "bigram": False}])
def test_causal_shapes_and_loss(opts):
    m = model(**opts)
    idx = tokens()
    logits, loss = m(idx, idx)
    assert logits.shape == (3, 24, 97) and loss.ndim == 0 and math.isfinite(loss.item())
    changed = idx.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 97
    logits2, _ = m(changed)
    assert torch.allclose(logits[:, :15], logits2[:, :15], atol=1e-5)  # the past never sees the future
    assert not torch.allclose(logits[:, 15:], logits2[:, 15:])


@pytest.mark.parametrize("impl", [masked_sdpa, SinkAttention.apply], ids=["masked_sdpa", "SinkAttention"])
def test_attention_sink_adds_exp_sink_to_the_softmax_denominator(impl):
    B, H, T, D = 2, 4, 6, 16
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    sink = torch.randn(H, requires_grad=True)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    weights = scores.exp() / (scores.exp().sum(-1, keepdim=True) + sink.exp().view(1, H, 1, 1))
    expected = weights @ v
    out = impl(q, k, v, sink)
    assert torch.allclose(out, expected, atol=1e-5)
    grad = torch.randn(B, H, T, D)
    for got, want in zip(torch.autograd.grad(out, (q, k, v, sink), grad), torch.autograd.grad(expected, (q, k, v, sink), grad)):
        assert torch.allclose(got, want, atol=1e-5)


def test_cpu_sink_attention_matches_the_fused_path_on_the_models_layout():
    # The model hands heads over as transposed views of one projection; both paths must agree there, forward
    # bit for bit (the same softmax), gradients to fp32 rounding.
    B, T, H, D = 3, 20, 4, 16
    qkv = torch.randn(B, T, 3 * H * D, requires_grad=True)
    sink = torch.randn(H, requires_grad=True)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    grad = torch.randn(B, H, T, D)
    ref, mine = masked_sdpa(q, k, v, sink), attention_with_sink(q, k, v, sink)
    assert torch.equal(ref, mine)
    for a, b in zip(torch.autograd.grad(ref, (qkv, sink), grad), torch.autograd.grad(mine, (qkv, sink), grad)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_init_follows_spec():
    m = GPT(ModelConfig(vocab_size=512, ctx_len=16, n_layer=4, d_model=256, d_mlp=1024))
    assert m.blocks[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.blocks[0].attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert m.blocks[3].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert m.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert (m.blocks[1].attn.c_attn.bias == 0).all() and (m.blocks[1].norm1.weight == 1).all()
    assert 0 <= m.bigram.min() and m.bigram.max() < 0.02 and m.bigram.mean().item() == pytest.approx(0.01, rel=0.05)
    assert m.blocks[0].attn.n_head == 16 and m.blocks[0].attn.c_attn.weight.shape == (768, 256)


def test_hooks_read_replace_and_mean_ablate_per_channel():
    m = model()
    idx = tokens()
    with record(m, ["1.mlp.neuron"]) as acts:
        base, _ = m(idx)
    clean = acts["1.mlp.neuron"]
    means = torch.randn(128)
    mask = torch.zeros(128, dtype=torch.bool)
    mask[[3, 50, 127]] = True
    with mean_ablate(m, {"1.mlp.neuron": (mask, means)}), record(m, ["1.mlp.neuron"]) as acts:
        ablated, _ = m(idx)
    got = acts["1.mlp.neuron"]
    assert torch.equal(got[..., mask], means[mask].expand(3, 24, 3))
    assert torch.equal(got[..., ~mask], clean[..., ~mask])
    assert not torch.allclose(ablated, base)
    with patch(m, {"0.resid_post": torch.zeros_like}):
        zeroed, _ = m(idx)
    assert not torch.allclose(zeroed, base)
    again, _ = m(idx)  # hooks are gone after the block
    assert torch.equal(again, base)


def test_logits_at_chosen_positions_match_the_full_forward():
    m = model()
    idx = tokens()
    full, _ = m(idx)
    last = torch.tensor([23, 5, 11])
    some, _ = m(idx, last=last)
    assert torch.allclose(some, full[torch.arange(3), last], atol=1e-6)


def test_abstopk_on_integer_keys_keeps_what_float_topk_keeps_ties_included():
    torch.manual_seed(0)
    for x in (torch.randn(64, 128), torch.randint(-3, 4, (64, 128)).float() * 0.5, torch.zeros(8, 16)):
        idx = x.abs().topk(32 if x.shape[1] == 128 else 4, dim=-1, sorted=False).indices
        expected = torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))
        assert torch.equal(abstopk(x, idx.shape[1]), expected)


def test_norm_eps_defaults_to_the_dtype_epsilon_and_bias_can_be_dropped():
    m = model()
    assert m.blocks[0].norm1.eps is None and m.norm_f.eps is None  # torch's default: the dtype's machine epsilon
    x = torch.full((1, 64), 3e-3)  # mean square 9e-6: eps 1.2e-7 leaves 0.993 of it, eps 1e-6 only 0.949
    y = m.norm_f(x)
    assert torch.allclose(y, torch.full_like(y, (1 + torch.finfo(torch.float32).eps / 9e-6) ** -0.5), rtol=1e-5)
    legacy = model(norm_eps=1e-6)
    assert legacy.blocks[0].norm1.eps == 1e-6 and torch.allclose(legacy.norm_f(x), torch.full_like(y, (1 + 1 / 9) ** -0.5), rtol=1e-5)
    assert model(norm=Norm.layer).norm_f.eps == 1e-5
    plain = model(bias=False)
    assert not [n for n, _ in plain.named_parameters() if n.endswith(".bias")]
    logits, loss = plain(tokens(), tokens(seed=2))
    loss.backward()
    assert logits.shape == (3, 24, 97) and torch.isfinite(loss)


def test_a_config_written_before_norm_eps_loads_with_the_epsilon_it_was_trained_with(tmp_path, capsys):
    from omegaconf import OmegaConf

    from sparse_lm.config import Config, load_yaml, to_yaml

    text = to_yaml(Config())
    old = OmegaConf.create(text)
    del old.model["norm_eps"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(old))
    assert load_yaml(tmp_path / "config.yaml").model.norm_eps == 1e-6
    assert "predates model.norm_eps; its RMSNorm was trained with eps 1e-06" in capsys.readouterr().err
    old.model.norm = "layer"  # LayerNorm always used torch's default, which null still means
    (tmp_path / "layer.yaml").write_text(OmegaConf.to_yaml(old))
    assert load_yaml(tmp_path / "layer.yaml").model.norm_eps is None
    (tmp_path / "new.yaml").write_text(text)
    assert load_yaml(tmp_path / "new.yaml").model.norm_eps is None
