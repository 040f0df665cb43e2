"""A GPT-2-style decoder for weight-sparse training (docs/method.md §1).

A plain nn.Module: it knows nothing of the sparsity projection, DDP or compilation, which are applied from
outside (sparse_lm.sparsity, sparse_lm.trainer). What is special here:

* Small heads (d_head 16), pre-norm RMSNorm blocks, no positional embedding by default, an optional attention
  sink, and a dense bigram table added to the logits so the sparse weights need not memorise bigrams.
* Every activation of interest passes through a `Site`: a module with a stable name (e.g. `3.attn.q`) that
  optionally applies AbsTopK and that hooks can read, replace or mean-ablate (see sparse_lm.hooks).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_lm.attention import attention_with_sink
from sparse_lm.config import Activation, ModelConfig, Norm, PosEmb
from sparse_lm.errors import UserError
from sparse_lm.roles import RESIDUAL, SITES, role, site_name, writes_residual


def abstopk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep, per token, the k entries of largest |x| along the last dim; zero the rest.

    Gradients flow through the kept entries only (gather/scatter are linear in the kept values).
    """
    if k >= x.shape[-1]:
        return x
    mag = x.detach().abs()
    if mag.dtype == torch.float32:
        # Non-negative floats order like their bit patterns, and torch.topk compares integers faster (~30% on
        # a CPU): the same entries are kept, ties included.
        mag = mag.view(torch.int32)
    idx = mag.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))


class Site(nn.Module):
    """A named activation site: optional AbsTopK, then a point where forward hooks see the value.

    `kind` is one of sparse_lm.roles.SITES (or RESIDUAL), `dim` its width; the full name (e.g. "3.attn.q") is
    assigned by GPT once the module tree is built. `k=None` means no activation sparsity here.
    """

    def __init__(self, kind: str, dim: int, k: int | None = None):
        super().__init__()
        self.kind, self.dim, self.k = kind, dim, k
        self.name = ""
        self.topk_fn = abstopk  # sparse_lm.backends may swap in the fused kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.k is None else self.topk_fn(x, self.k)

    def extra_repr(self) -> str:
        return f"{self.name!r}, k={self.k}"


def make_sites(cfg: ModelConfig, prefix: str, dims: dict[str, int]) -> nn.ModuleDict:
    """The Sites of the attention or MLP sub-block: those of roles.SITES starting with `prefix`, keyed by the
    rest of their name ("q", "neuron"), each with AbsTopK keeping floor(afrac · dim) entries when switched on."""
    sites = {}
    for kind in SITES:
        if kind.startswith(prefix + "_"):
            dim = dims[kind]
            sites[kind.split("_", 1)[1]] = Site(kind, dim, math.floor(cfg.afrac * dim) if kind in cfg.topk_sites else None)
    return nn.ModuleDict(sites)


def make_norm(cfg: ModelConfig) -> nn.Module:
    # Gain only, no bias: with RMSNorm zero stays a privileged value of the residual stream.
    if cfg.norm == Norm.rms:
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)  # None: the dtype's machine epsilon, at run time
    return nn.LayerNorm(cfg.d_model, eps=1e-5 if cfg.norm_eps is None else cfg.norm_eps, bias=False)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.d_head = cfg.d_model // cfg.d_head, cfg.d_head
        width = self.n_head * self.d_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * width, bias=cfg.bias)
        self.c_proj = nn.Linear(width, cfg.d_model, bias=cfg.bias)
        # q/k/v top-k acts over the concatenation of all heads, not per head.
        d = cfg.d_model
        self.sites = make_sites(cfg, "attn", {"attn_in": d, "attn_q": width, "attn_k": width, "attn_v": width, "attn_out": d})
        # One logit per head for an extra key/value slot whose key and value are zero: it only adds
        # exp(sink) to the softmax denominator, letting a head attend "nowhere".
        self.sink = nn.Parameter(torch.zeros(self.n_head)) if cfg.attn_sink else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        x = self.sites["in"](x)
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        q, k, v = self.sites["q"](q), self.sites["k"](k), self.sites["v"](v)
        q, k, v = (t.view(B, T, self.n_head, self.d_head).transpose(1, 2) for t in (q, k, v))
        if self.sink is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = attention_with_sink(q, k, v, self.sink)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.d_head)
        return self.sites["out"](self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias)
        self.act = nn.GELU() if cfg.activation == Activation.gelu else nn.ReLU()
        self.c_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.bias)
        self.sites = make_sites(cfg, "mlp", {"mlp_in": cfg.d_model, "mlp_neuron": cfg.d_mlp, "mlp_out": cfg.d_model})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_fc(self.sites["in"](x))
        x = self.sites["neuron"](self.act(x))
        return self.sites["out"](self.c_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        # The residual stream itself is never top-k'd; these sites only name it.
        self.sites = nn.ModuleDict({kind: Site(kind, cfg.d_model) for kind in RESIDUAL})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sites["resid_pre"](x)
        x = self.sites["resid_mid"](x + self.attn(self.norm1(x)))
        return self.sites["resid_post"](x + self.mlp(self.norm2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        unknown = set(cfg.topk_sites) - set(SITES)
        if unknown:
            raise UserError(f"model.topk_sites: unknown site(s) {sorted(unknown)}; choose from {list(SITES)}")
        if cfg.d_model % cfg.d_head:
            raise UserError(f"model.d_model={cfg.d_model} must be a multiple of model.d_head={cfg.d_head}")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.ctx_len, cfg.d_model) if cfg.pos_emb == PosEmb.learned else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Dense: the row of the current token is added to the logits. Excluded from sparsity and decay.
        self.bigram = nn.Parameter(torch.empty(cfg.vocab_size, cfg.vocab_size)) if cfg.bigram else None

        self.sites: dict[str, Site] = {}  # stable name -> Site, e.g. "3.attn.q", "0.resid_mid"
        for i, block in enumerate(self.blocks):
            for site in (*block.sites.values(), *block.attn.sites.values(), *block.mlp.sites.values()):
                site.name = site_name(i, site.kind)
                self.sites[site.name] = site
        for site in self.sites.values():
            if site.k == 0:
                raise UserError(f"model.afrac={cfg.afrac} keeps none of the {site.dim} channels at {site.kind} (floor(afrac · "
                                 f"{site.dim}) = 0), which would zero that site; raise model.afrac or drop {site.kind} from model.topk_sites")
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            kind = role(name).kind
            if kind == "bigram":
                p.uniform_(0, 1).mul_(0.02)
            elif kind == "gain":
                p.fill_(1.0)
            elif kind in ("bias", "sink"):
                p.zero_()
            elif writes_residual(name):
                # Residual-writing projections are scaled down with depth (GPT-2).
                p.normal_(0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                p.normal_(0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, last: torch.Tensor | None = None):
        """idx: [B, T] token ids. Returns (logits [B, T, vocab], loss or None).

        With `last` [B] (a position per row), only those positions reach the unembedding: logits are [B, vocab].
        """
        T = idx.shape[1]
        if T > self.cfg.ctx_len:
            raise UserError(f"sequence length {T} exceeds model.ctx_len={self.cfg.ctx_len}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        if last is not None:
            rows = torch.arange(idx.shape[0], device=idx.device)
            x, idx = x[rows, last], idx[rows, last]
        logits = self.lm_head(self.norm_f(x))
        if self.bigram is not None:
            # F.embedding rather than bigram[idx]: its CPU backward is deterministic (index_put's is not).
            logits = logits + F.embedding(idx, self.bigram)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss

    def site(self, name: str) -> Site:
        try:
            return self.sites[name]
        except KeyError:
            raise KeyError(f"no activation site {name!r}; sites look like {list(self.sites)[:11]}") from None
