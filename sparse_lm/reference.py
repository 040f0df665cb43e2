"""The reference checkpoint format: the paper's released models (OpenAI's circuit_sparsity, `csp_*`, `dense1_*`).

A reference model is a directory holding `beeg_config.json` (its GPTConfig as JSON) and `final_model.pt` (a
state dict). `import_model` maps both onto our ModelConfig and parameter names; `export_model` writes ours in that
format, in a form the reference loader accepts. Anything our model cannot represent stops with an error naming the
reference field and its value: a converted model computes what the reference model computes, or there is none.

Mapping (reference → ours): block_size → ctx_len; n_mlp / d_mlp → d_mlp; n_head · d_head must equal d_model
(d_head kept); rms_norm → norm=rms (LayerNorm only without ln_bias); bias → bias; activation_type → activation;
afrac with afrac_loctypes → afrac and topk_sites (no afrac: no site); sink → attn_sink when the weights hold sink
logits (the reference builds them only with flash attention); enable_bigram_table →
bigram; tied_unembed → lm_head a copy of wte; final_logits_bias → added to every bigram row (zero without a table);
wpe → learned positions, or none when it is all zero (the reference always adds it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sparse_lm.config import Activation, ModelConfig, Norm, PosEmb
from sparse_lm.errors import UserError
from sparse_lm.roles import SITES

CONFIG_FILE, WEIGHTS_FILE = "beeg_config.json", "final_model.pt"
# Fields that change nothing in a trained model's forward pass (training, kernels, memory), safe to ignore. `flash`
# is overridden by the reference loader's own argument; whether a sink exists is read from the weights instead.
INERT = {"dropout", "flash", "grad_checkpointing", "debug_nans", "enable_sparse_kernels", "learnable_bigram_table",
         "tokenizer_name", "bigram_table_rank", "pfrac", "dropout_cat_pos_emb", "sinusoidal_cat_pos_emb"}
MAPPED = {"block_size", "vocab_size", "n_layer", "n_head", "d_head", "d_model", "d_mlp", "n_mlp", "bias", "ln_bias", "rms_norm",
          "residual_activation_type", "activation_type", "afrac", "afrac_loctypes", "tied_unembed", "enable_bigram_table",
          "d_pos_emb", "sink", "use_tied_aux_matrix"}
DEFAULT_LOCTYPES = "attn_in,attn_out,mlp_in,mlp_out"  # the reference GPTConfig's default


def is_reference_dir(path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise UserError(f"{directory}: no {name} (a reference model directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        ref = json.loads((directory / CONFIG_FILE).read_text())
        sd = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{directory}: unreadable reference model ({type(e).__name__}: {e})") from None
    return ref, sd


def refuse(field: str, value, why: str):
    raise UserError(f"reference field {field}={value!r}: {why}; sparse_lm's model cannot represent it, so it is not converted")


def model_config(ref: dict, sd: dict[str, torch.Tensor]) -> ModelConfig:
    unknown = sorted(set(ref) - INERT - MAPPED)
    if unknown:
        refuse(unknown[0], ref[unknown[0]], "unknown to this converter")
    if ref.get("use_tied_aux_matrix"):
        refuse("use_tied_aux_matrix", True, "an auxiliary matrix the reference loader refuses too")
    if ref.get("d_pos_emb") is not None:
        refuse("d_pos_emb", ref["d_pos_emb"], "positional embeddings concatenated to each block's input")
    if ref.get("residual_activation_type", "identity") != "identity":
        refuse("residual_activation_type", ref["residual_activation_type"], "an activation on the residual stream")
    rms = ref.get("rms_norm", False)
    if not rms and ref.get("ln_bias", True):
        refuse("ln_bias", ref.get("ln_bias", True), "LayerNorm with a bias (ours has a gain only)")
    d_model, n_head = ref.get("d_model", 768), ref.get("n_head", 12)
    d_head = ref.get("d_head") or d_model // n_head
    if n_head * d_head != d_model:
        refuse("d_head", d_head, f"n_head · d_head = {n_head * d_head} differs from d_model = {d_model}")
    afrac = ref.get("afrac")
    loctypes = [s for s in ref.get("afrac_loctypes", DEFAULT_LOCTYPES).split(",") if s] if afrac is not None else []
    for site in loctypes:
        if site not in SITES:
            refuse("afrac_loctypes", ref.get("afrac_loctypes", DEFAULT_LOCTYPES), f"AbsTopK at {site!r}, not one of our sites {list(SITES)}")
    if ref.get("activation_type", "gelu") not in ("gelu", "relu"):
        refuse("activation_type", ref["activation_type"], "an activation other than gelu or relu")
    wpe = sd.get("transformer.wpe.weight")
    learned = wpe is not None and bool(wpe.count_nonzero())
    # The reference builds its sink only with flash attention; a sink model used without one has no sink_logit.
    sink = bool(ref.get("sink", False)) and any(k.endswith("attn_imp.sink_logit") for k in sd)
    return ModelConfig(
        vocab_size=ref.get("vocab_size", 50304), ctx_len=ref.get("block_size", 1024), n_layer=ref.get("n_layer", 12),
        d_model=d_model, d_head=d_head, d_mlp=ref.get("n_mlp") or ref.get("d_mlp") or 4 * d_model,  # the loader lets n_mlp win
        norm=Norm.rms if rms else Norm.layer, norm_eps=None, bias=ref.get("bias", True),
        activation=Activation(ref.get("activation_type", "gelu")), pos_emb=PosEmb.learned if learned else PosEmb.none,
        attn_sink=sink, bigram=ref.get("enable_bigram_table", False),
        afrac=afrac if afrac is not None else ModelConfig.afrac, topk_sites=[s for s in SITES if s in loctypes])


# Our parameter name -> the reference's, per layer ({i}) or whole-model.
LAYER_NAMES = {
    "norm1.weight": "ln_1.weight", "norm2.weight": "ln_2.weight", "attn.sink": "attn.attn_imp.sink_logit",
    **{f"{m}.{p}": f"{m}.{p}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj") for p in ("weight", "bias")},
}
MODEL_NAMES = {"wte.weight": "transformer.wte.weight", "wpe.weight": "transformer.wpe.weight", "norm_f.weight": "transformer.ln_f.weight",
               "lm_head.weight": "lm_head.weight", "bigram": "bigram_table"}


def names(cfg: ModelConfig) -> dict[str, str]:
    """Every parameter of our model of `cfg` -> the reference's name for it."""
    from sparse_lm.model import GPT

    with torch.device("meta"):
        ours = [n for n, _ in GPT(cfg).named_parameters()]
    out = {}
    for n in ours:
        if n.startswith("blocks."):
            _, i, rest = n.split(".", 2)
            out[n] = f"transformer.h.{i}.{LAYER_NAMES[rest]}"
        else:
            out[n] = MODEL_NAMES[n]
    return out


def import_weights(ref: dict, sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    mapping = names(cfg)
    theirs = dict(sd)
    logits_bias = theirs.pop("final_logits_bias", None)
    for key in [k for k in theirs if k.endswith(".attn.bias") and theirs[k].dim() == 4]:
        del theirs[key]  # the causal-mask buffer of the reference's non-flash attention, not a parameter
    if cfg.pos_emb == PosEmb.none:
        theirs.pop("transformer.wpe.weight", None)  # all zero: adds nothing
    if ref.get("tied_unembed", True):  # one tensor in the reference: lm_head.weight, loaded after wte, holds it
        tied = theirs.get("lm_head.weight", theirs.get("transformer.wte.weight"))
        theirs["lm_head.weight"] = theirs["transformer.wte.weight"] = tied
    from sparse_lm.model import GPT

    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in GPT(cfg).named_parameters()}
    out = {}
    for ours, name in mapping.items():
        if name not in theirs:
            raise UserError(f"{WEIGHTS_FILE}: no {name} (for our {ours}) in a model whose config asks for it")
        w = theirs.pop(name)
        if tuple(w.shape) != shapes[ours]:
            raise UserError(f"{WEIGHTS_FILE}: {name} has shape {tuple(w.shape)}, but {CONFIG_FILE} implies {shapes[ours]}")
        out[ours] = w.detach().clone().float().contiguous()  # a tied unembedding becomes a copy
    if theirs:
        raise UserError(f"{WEIGHTS_FILE}: {sorted(theirs)[0]} has no place in the converted model ({len(theirs)} such entries)")
    if logits_bias is not None and bool(logits_bias.count_nonzero()):
        if not cfg.bigram:
            refuse("final_logits_bias", "nonzero", "a logit bias without a bigram table to carry it")
        out["bigram"] = out["bigram"] + logits_bias.float()  # the same vector on every row: the same logits
    return out


def export(cfg: ModelConfig, weights: dict[str, torch.Tensor], hidden_density: float | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our model as (beeg_config.json, final_model.pt) the reference loader accepts."""
    if cfg.norm_eps is not None and not (cfg.norm == Norm.layer and cfg.norm_eps == 1e-5):
        raise UserError(f"model.norm_eps={cfg.norm_eps}: the reference's norms use torch's default epsilon, so this model would "
                        f"compute something else there (RMSNorm checkpoints from before model.norm_eps were trained with 1e-6)")
    ref = {"block_size": cfg.ctx_len, "vocab_size": cfg.vocab_size, "n_layer": cfg.n_layer, "n_head": cfg.d_model // cfg.d_head,
           "d_head": cfg.d_head, "d_model": cfg.d_model, "d_mlp": cfg.d_mlp, "dropout": 0.0, "bias": cfg.bias, "ln_bias": False,
           "rms_norm": cfg.norm == Norm.rms, "residual_activation_type": "identity", "activation_type": cfg.activation.value,
           "afrac": cfg.afrac, "afrac_loctypes": ",".join(cfg.topk_sites),
           "tied_unembed": False, "grad_checkpointing": False, "enable_bigram_table": cfg.bigram, "learnable_bigram_table": cfg.bigram,
           "flash": True, "sink": cfg.attn_sink,
           # the reference loader pops these two unconditionally
           "bigram_table_rank": None, "pfrac": hidden_density}
    sd = {name: weights[ours].detach().clone().contiguous() for ours, name in names(cfg).items()}
    if cfg.pos_emb == PosEmb.none:
        sd["transformer.wpe.weight"] = torch.zeros(cfg.ctx_len, cfg.d_model)  # the reference always adds wpe
    sd["final_logits_bias"] = torch.zeros(cfg.vocab_size)
    return ref, sd
