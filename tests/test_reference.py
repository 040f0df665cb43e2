"""The reference checkpoint format (sparse_lm/reference.py, sparse_lm/convert.py) and the tiktoken tokenizer adapter.

The fixtures are written by hand in the reference's format: its key names, shapes and dtypes, a tied unembedding, a
nonzero final_logits_bias, an all-zero wpe and the causal-mask buffer of its non-flash attention. The logits of a
converted model are checked against an independent transcription of the reference's forward pass.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparse_lm import checkpoint, reference
from sparse_lm.cli import load_model
from sparse_lm.config import Activation, Norm, PosEmb
from sparse_lm.convert import from_reference, main, to_reference
from sparse_lm.errors import UserError
from tests.conftest import REPO

V, D, L, H, DH, M, T = 300, 32, 2, 2, 16, 64, 32
REF = {"block_size": T, "vocab_size": V, "n_layer": L, "n_head": H, "d_head": DH, "d_model": D, "n_mlp": M, "dropout": 0.0,
       "bias": True, "ln_bias": True, "rms_norm": True, "residual_activation_type": "identity", "activation_type": "gelu",
       "afrac": 0.25, "afrac_loctypes": "attn_in,attn_out,mlp_in,mlp_out,mlp_neuron", "tied_unembed": True,
       "tokenizer_name": "tinypython_2k", "grad_checkpointing": True, "enable_bigram_table": True, "learnable_bigram_table": False,
       "sink": True, "flash": True, "bigram_table_rank": None, "pfrac": 0.25}


def reference_weights(ref: dict = REF, seed=0, learned_wpe=False) -> dict[str, torch.Tensor]:
    """A state dict as the reference's GPT of `ref` holds it (biases, sink logits and mask buffers where it has them)."""
    g = torch.Generator().manual_seed(seed)
    d, h, dh, m, t, v = ref["d_model"], ref["n_head"], ref.get("d_head") or ref["d_model"] // ref["n_head"], ref.get("n_mlp", M), ref["block_size"], ref["vocab_size"]

    def r(*shape, density=1.0):
        w = torch.randn(*shape, generator=g) * 0.3
        return w * (torch.rand(*shape, generator=g) < density)

    wte = r(v, d, density=0.5)
    sd = {"transformer.wte.weight": wte, "transformer.wpe.weight": r(t, d) if learned_wpe else torch.zeros(t, d),
          "transformer.ln_f.weight": 1 + r(d) * 0.1, "lm_head.weight": wte if ref.get("tied_unembed", True) else r(v, d, density=0.5),
          "final_logits_bias": r(v)}
    if ref.get("enable_bigram_table"):
        sd["bigram_table"] = r(v, v)
    for i in range(ref["n_layer"]):
        p = f"transformer.h.{i}."
        sd |= {p + "ln_1.weight": 1 + r(d) * 0.1, p + "ln_2.weight": 1 + r(d) * 0.1, p + "attn.c_attn.weight": r(3 * h * dh, d, density=0.25),
               p + "attn.c_proj.weight": r(d, h * dh, density=0.25), p + "mlp.c_fc.weight": r(m, d, density=0.25),
               p + "mlp.c_proj.weight": r(d, m, density=0.25), p + "attn.bias": torch.tril(torch.ones(t, t)).view(1, 1, t, t)}
        if ref.get("bias", True):
            sd |= {p + "attn.c_attn.bias": r(3 * h * dh), p + "attn.c_proj.bias": r(d), p + "mlp.c_fc.bias": r(m), p + "mlp.c_proj.bias": r(d)}
        if ref.get("sink"):
            sd[p + "attn.attn_imp.sink_logit"] = r(h)
    return sd


def write_reference(directory: Path, ref: dict | None = None, sd: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "beeg_config.json").write_text(json.dumps(REF if ref is None else ref))
    torch.save(reference_weights() if sd is None else sd, directory / "final_model.pt")
    return directory


def reference_forward(sd: dict, ref: dict, idx: torch.Tensor) -> torch.Tensor:
    """The reference GPT's forward pass (flash attention), transcribed from its definition, not from ours."""
    sites = ref["afrac_loctypes"].split(",") if ref.get("afrac") is not None else []
    h, d = ref["n_head"], ref["d_model"]
    dh = ref.get("d_head") or d // h
    act = F.gelu if ref.get("activation_type", "gelu") == "gelu" else F.relu

    def topk(x, site):
        if site not in sites:
            return x
        vals, inds = torch.topk(x.abs(), int(ref["afrac"] * x.shape[-1]), dim=-1)
        return torch.zeros_like(x).scatter(-1, inds, x.gather(-1, inds))

    def norm(x, w):
        if ref.get("rms_norm"):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps) * w
        c = x - x.mean(-1, keepdim=True)
        return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def linear(x, name):
        return x @ sd[name + ".weight"].T + (sd[name + ".bias"] if ref.get("bias", True) else 0)

    B, t = idx.shape
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:t]
    for i in range(ref["n_layer"]):
        p = f"transformer.h.{i}."
        y = topk(norm(x, sd[p + "ln_1.weight"]), "attn_in")
        q, k, v = linear(y, p + "attn.c_attn").split(h * dh, dim=2)
        q, k, v = topk(q, "attn_q"), topk(k, "attn_k"), topk(v, "attn_v")
        q, k, v = (z.view(B, t, h, dh).transpose(1, 2) for z in (q, k, v))
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(dh)).masked_fill(torch.ones(t, t).tril() == 0, float("-inf"))
        if ref.get("sink"):  # a zero key and value with logit `sink`, always visible
            sink = sd[p + "attn.attn_imp.sink_logit"].view(1, h, 1, 1).expand(B, h, t, 1)
            w = torch.softmax(torch.cat([sink, att], dim=-1), dim=-1)[..., 1:]
        else:
            w = torch.softmax(att, dim=-1)
        y = (w @ v).transpose(1, 2).reshape(B, t, h * dh)
        x = x + topk(linear(y, p + "attn.c_proj"), "attn_out")
        y = topk(norm(x, sd[p + "ln_2.weight"]), "mlp_in")
        y = topk(act(linear(y, p + "mlp.c_fc")), "mlp_neuron")
        x = x + topk(linear(y, p + "mlp.c_proj"), "mlp_out")
    x = norm(x, sd["transformer.ln_f.weight"])
    logits = x @ sd["lm_head.weight"].T + sd["final_logits_bias"]
    return logits + sd["bigram_table"][idx] if ref.get("enable_bigram_table") else logits


@pytest.fixture(scope="module")
def tiktoken_dir(tmp_path_factory, corpus):
    """A small tiktoken tokenizer: GPT-2-format files made from a BPE trained on the test corpus."""
    pytest.importorskip("tiktoken", reason="tiktoken is not installed (pip install -e '.[reference]')")
    from tests.conftest import write_data_gym
    from sparse_lm.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tinypython")
    write_data_gym(train_tokenizer([p.read_text() for p in sorted(corpus.glob("*.py"))], V), out)
    return out


def test_the_reference_config_maps_as_documented():
    cfg = reference.model_config(REF, reference_weights())
    assert (cfg.vocab_size, cfg.ctx_len, cfg.n_layer, cfg.d_model, cfg.d_head, cfg.d_mlp) == (V, T, L, D, DH, M)
    assert (cfg.norm, cfg.norm_eps, cfg.bias, cfg.activation) == (Norm.rms, None, True, Activation.gelu)
    assert cfg.afrac == 0.25 and cfg.topk_sites == ["attn_in", "attn_out", "mlp_in", "mlp_neuron", "mlp_out"]
    assert cfg.attn_sink and cfg.bigram and cfg.pos_emb == PosEmb.none  # wpe all zero: position-free
    moved = reference_weights()
    moved["transformer.wpe.weight"] = torch.randn(T, D)
    assert reference.model_config(REF, moved).pos_emb == PosEmb.learned
    assert reference.model_config({**REF, "afrac": None}, moved).topk_sites == []
    assert reference.model_config({**REF, "rms_norm": False, "ln_bias": False, "bias": False, "activation_type": "relu"}, moved).norm == Norm.layer
    plain = {k: v for k, v in REF.items() if k not in ("n_mlp", "d_head", "sink", "enable_bigram_table", "afrac_loctypes")}
    cfg = reference.model_config(plain, moved)  # the reference's defaults: d_mlp 4·d_model, d_head d_model/n_head, ...
    assert (cfg.d_mlp, cfg.d_head, cfg.attn_sink, cfg.bigram) == (4 * D, D // H, False, False)
    assert cfg.topk_sites == ["attn_in", "attn_out", "mlp_in", "mlp_out"]  # ... and its default afrac_loctypes


VARIANTS = {
    "rms, gelu, sink, bigram, tied": ({}, False),
    "layer norm, relu, no bias, no sink": ({"rms_norm": False, "ln_bias": False, "activation_type": "relu", "bias": False, "sink": False}, False),
    "learned positions, untied, no bigram, no afrac": ({"tied_unembed": False, "enable_bigram_table": False, "afrac": None}, True),
    "q/k/v sites, n_mlp": ({"afrac_loctypes": "attn_q,attn_k,attn_v,mlp_neuron", "n_mlp": 48}, False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_converted_model_computes_the_reference_logits(tmp_path, tiktoken_dir, variant):
    change, learned_wpe = VARIANTS[variant]
    ref = {**REF, **change}
    sd = reference_weights(ref, learned_wpe=learned_wpe)
    if not ref["enable_bigram_table"]:
        sd["final_logits_bias"] = torch.zeros(V)  # nothing could carry a logit bias
    src = write_reference(tmp_path / "csp_test", ref, sd)
    out = from_reference(src, tmp_path / "ours", tokenizer=str(tiktoken_dir))
    model, tok, cfg, state = load_model(out)
    idx = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)[0]
        theirs = reference_forward(sd, ref, idx)
    assert torch.allclose(ours, theirs, atol=2e-5, rtol=1e-5), (ours - theirs).abs().max()
    assert cfg.model.pos_emb == (PosEmb.learned if learned_wpe else PosEmb.none) and cfg.model.d_mlp == ref["n_mlp"]
    weights = torch.load(out / "model.pt", weights_only=True)
    if ref["tied_unembed"]:
        assert torch.equal(weights["lm_head.weight"], weights["wte.weight"])  # the tied unembedding, as a copy
    assert state["converted_from"]["densities"]["hidden"] == pytest.approx(0.25, abs=0.03)
    assert tok.get_vocab_size() == V and tok.token_to_id("<|endoftext|>") == V - 1


def test_a_converted_model_is_inspected_with_the_densities_found(tmp_path, tiktoken_dir):
    out = from_reference(write_reference(tmp_path / "csp_test"), tmp_path / "ours", tokenizer=str(tiktoken_dir))
    inspected = subprocess.run([sys.executable, "-m", "sparse_lm.inspect", str(out)], cwd=REPO, capture_output=True, text=True)
    assert inspected.returncode == 0 and "densities found: embed" in inspected.stdout and "hidden 0.2" in inspected.stdout


def test_an_exported_model_computes_the_same_logits_in_the_reference(tmp_path):
    """Export checked by the transcription of the reference, not by our own importer."""
    from sparse_lm.config import ModelConfig
    from sparse_lm.model import GPT

    for extra in ({}, {"bias": False, "attn_sink": False, "activation": Activation.relu, "norm": Norm.layer}):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=V, ctx_len=T, n_layer=L, d_model=D, d_head=DH, d_mlp=M, topk_sites=["attn_in", "attn_k", "mlp_neuron"], **extra)
        model = GPT(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("bias", "sink")):
                    p.normal_()
        ref, sd = reference.export(cfg, model.state_dict(), 0.25)
        idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            assert torch.allclose(model(idx)[0], reference_forward(sd, ref, idx), atol=2e-5, rtol=1e-5), extra


@pytest.mark.parametrize("change, field", [
    ({"residual_activation_type": "relu"}, "residual_activation_type='relu'"),
    ({"d_pos_emb": 8}, "d_pos_emb=8"),
    ({"rms_norm": False}, "ln_bias=True"),
    ({"afrac_loctypes": "attn_in,resid_post_mlp"}, "afrac_loctypes='attn_in,resid_post_mlp'"),
    ({"d_head": 8}, "d_head=8"),
    ({"rotary": True}, "rotary=True"),
    ({"enable_bigram_table": False}, "final_logits_bias='nonzero'"),
])
def test_what_our_model_cannot_represent_fails_naming_the_field(tmp_path, tiktoken_dir, change, field):
    sd = reference_weights()
    if change.get("enable_bigram_table") is False:
        del sd["bigram_table"]
    src = write_reference(tmp_path / "bad", {**REF, **change}, sd)  # final_logits_bias stays nonzero
    with pytest.raises(UserError, match=f"reference field {field.replace('(', '[(]')}"):
        from_reference(src, tmp_path / "out", tokenizer=str(tiktoken_dir))
    assert not (tmp_path / "out").exists()


def test_export_then_import_is_bit_exact_and_prune_runs_on_the_reference_directory(tiny_run, tmp_path, corpus):
    ref_dir = tmp_path / "exported"
    assert main(["to_reference", str(tiny_run), str(ref_dir)]) is None
    ref = json.loads((ref_dir / "beeg_config.json").read_text())
    sd = torch.load(ref_dir / "final_model.pt", weights_only=True)
    assert "pfrac" in ref and "bigram_table_rank" in ref  # the reference loader pops both
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (3 * 32, 32) and sd["final_logits_bias"].abs().sum() == 0
    back = from_reference(ref_dir, tmp_path / "back")
    original, converted = checkpoint.load_weights(checkpoint.resolve(tiny_run)), checkpoint.load_weights(back)
    assert original.keys() == converted.keys() and all(torch.equal(original[k], converted[k]) for k in original)
    assert checkpoint.load_config(back).model == checkpoint.load_config(checkpoint.resolve(tiny_run)).model
    # every tool takes the reference directory itself (converted once into the cache)
    out = tmp_path / "circuits"
    cmd = [sys.executable, "-m", "sparse_lm.prune", f"checkpoint={ref_dir}", "tasks=all", f"out_dir={out}", f"means_data={corpus}",
           "steps=5", "n_train=32", "n_test=16", "n_calib=16"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["tasks"]) + len(summary["unusable_with_tokenizer"]) == 20
    assert summary["means_from"]["source"]["root"] == str(corpus) and summary["means_from"]["tokenizer"] == "the model's own"
    with pytest.raises(UserError, match="exists"):
        to_reference(tiny_run, ref_dir)


def test_a_model_with_another_norm_epsilon_is_not_exported_as_the_reference(tmp_path):
    from sparse_lm.config import ModelConfig

    with pytest.raises(UserError, match="model.norm_eps=1e-06"):
        reference.export(ModelConfig(norm_eps=1e-6, n_layer=1, d_model=32, d_mlp=64, vocab_size=300, ctx_len=8), {}, None)


def test_the_tiktoken_adapter_passes_the_tokenizer_checks(tiktoken_dir, corpus):
    from sparse_lm.circuits.tasks import TASKS, TaskTokenError, build
    from sparse_lm.data.tiktoken_tokenizer import TiktokenTokenizer

    tok = TiktokenTokenizer(tiktoken_dir)
    assert tok.get_vocab_size() == V and tok.token_to_id("<|endoftext|>") == V - 1 and tok.id_to_token(V - 1) == "<|endoftext|>"
    texts = [p.read_text() for p in sorted(corpus.glob("*.py"))[:10]]
    for text, batch in zip(texts, tok.encode_batch(texts)):
        ids = tok.encode(text).ids
        assert ids == batch.ids and tok.decode(ids) == text and max(ids) < V - 1
    assert tok.encode("a<|endoftext|>b").ids[1] == V - 1  # the special token, as our tokenizer reads it
    assert tok.token_to_id(tok.id_to_token(tok.encode(" return").ids[0])) == tok.encode(" return").ids[0]
    posed = 0
    for task in TASKS:  # the single-token checks run against this tokenizer: a task poses, or is refused by name
        try:
            build(task, tok, "train", 50)
            posed += 1
        except TaskTokenError as e:
            assert task in str(e)
    assert posed > 0
    broken = tiktoken_dir.parent / "broken"
    broken.mkdir()
    (broken / "encoder.json").write_text((tiktoken_dir / "encoder.json").read_text())
    (broken / "vocab.bpe").write_text("#version: 0.2\nx y\n")
    with pytest.raises(UserError, match="do not describe one byte-level BPE"):
        TiktokenTokenizer(broken)


def test_the_data_cache_encodes_with_a_given_tokenizer(tiktoken_dir, corpus, tmp_path):
    from sparse_lm.config import DataConfig, Source
    from sparse_lm.data.cache import prepare
    from sparse_lm.data.sources import is_val
    from sparse_lm.data.tiktoken_tokenizer import TiktokenTokenizer

    tok = TiktokenTokenizer(tiktoken_dir)
    cfg = DataConfig(source=Source.dir, path=str(corpus), vocab_size=V, cache_dir=str(tmp_path))
    data = prepare(cfg, tok)
    first = next(f for f in sorted(p.name for p in corpus.glob("*.py")) if not is_val(f, cfg.val_fraction))
    doc = [int(t) for t in data.train[: int((data.train == V - 1).argmax())]]
    assert doc == tok.encode((corpus / first).read_text()).ids  # the first training file, in the given tokenizer's ids
    assert (data.dir / "tiktoken" / "vocab.bpe").is_file() and prepare(cfg, tok).dir == data.dir and prepare(cfg).dir != data.dir


def test_a_hub_model_loads_from_its_local_snapshot_and_fails_clearly_without_network(tmp_path, tiktoken_dir):
    import os
    import shutil

    hub = tmp_path / "hub"  # the Hugging Face cache layout: refs/main names the snapshot
    snapshot = hub / "models--someone--csp" / "snapshots" / ("a" * 40)
    write_reference(snapshot / "csp_test")
    shutil.copytree(tiktoken_dir, snapshot / "csp_test" / "tokenizer")
    (hub / "models--someone--csp" / "refs").mkdir(parents=True)
    (hub / "models--someone--csp" / "refs" / "main").write_text("a" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-m", "sparse_lm.inspect", "hf:someone/csp/csp_test"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "converted from" in ok.stdout and "csp_test" in ok.stdout, ok.stderr[-2000:]
    missing = subprocess.run([sys.executable, "-m", "sparse_lm.inspect", "hf:someone/other"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1
    assert "hf:someone/other: not in the local Hugging Face cache and not downloadable" in missing.stderr
    assert "download the model elsewhere and give its directory instead" in missing.stderr


def test_shapes_sinks_and_tokenizers_are_read_from_what_is_there(tmp_path, tiktoken_dir, monkeypatch):
    sd = reference_weights()
    sd["transformer.wte.weight"] = sd["lm_head.weight"] = torch.zeros(V + 1, D)
    with pytest.raises(UserError, match=r"transformer.wte.weight has shape \(301, 32\), but beeg_config.json implies \(300, 32\)"):
        from_reference(write_reference(tmp_path / "shape", REF, sd), tmp_path / "o1", tokenizer=str(tiktoken_dir))
    no_logits = {k: w for k, w in reference_weights().items() if "sink_logit" not in k}  # sink=true, used without flash
    out = from_reference(write_reference(tmp_path / "nosink", REF, no_logits), tmp_path / "o2", tokenizer=str(tiktoken_dir))
    assert checkpoint.load_config(out).model.attn_sink is False
    # a tokenizer beside the model wins over $TINYPYTHON_TOK_DIR; without either, the error says where to put one
    src = write_reference(tmp_path / "beside")
    import shutil

    shutil.copytree(tiktoken_dir, src / "tokenizer")
    monkeypatch.setenv("TINYPYTHON_TOK_DIR", str(tmp_path / "elsewhere"))
    assert from_reference(src, tmp_path / "o3").joinpath("tiktoken", "vocab.bpe").read_text() == (tiktoken_dir / "vocab.bpe").read_text()
    with pytest.raises(UserError, match="no tokenizer found for this model .* or set TINYPYTHON_TOK_DIR"):
        from_reference(write_reference(tmp_path / "bare"), tmp_path / "o4")
