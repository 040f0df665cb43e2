"""A GPT-2-style decoder for weight-sparse training (SPEC §1).

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

from sparse_lm.config import TOPK_SITES, Activation, ModelConfig, Norm, PosEmb


def abstopk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep, per token, the k entries of largest |x| along the last dim; zero the rest.

    Gradients flow through the kept entries only (gather/scatter are linear in the kept values).
    """
    if k >= x.shape[-1]:
        return x
    idx = x.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


class Site(nn.Module):
    """A named activation site: optional AbsTopK, then a point where forward hooks see the value.

    The name is assigned by GPT once the module tree is built; `k=None` means no activation sparsity here.
    """

    def __init__(self, k: int | None = None):
        super().__init__()
        self.k = k
        self.name = ""
        self.topk_fn = abstopk  # sparse_lm.backends may swap in the fused kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.k is None else self.topk_fn(x, self.k)

    def extra_repr(self) -> str:
        return f"{self.name!r}, k={self.k}"


def make_norm(cfg: ModelConfig) -> nn.Module:
    # Gain only, no bias: with RMSNorm zero stays a privileged value of the residual stream.
    if cfg.norm == Norm.rms:
        return nn.RMSNorm(cfg.d_model, eps=1e-6)
    return nn.LayerNorm(cfg.d_model, bias=False)


def topk_k(cfg: ModelConfig, site: str, dim: int) -> int | None:
    """k for AbsTopK at `site` (one of TOPK_SITES), or None when that site is switched off."""
    return math.floor(cfg.afrac * dim) if site in cfg.topk_sites else None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.d_head = cfg.d_model // cfg.d_head, cfg.d_head
        width = self.n_head * self.d_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * width)
        self.c_proj = nn.Linear(width, cfg.d_model)
        # q/k/v top-k acts over the concatenation of all heads, not per head.
        self.sites = nn.ModuleDict(
            {
                "in": Site(topk_k(cfg, "attn_in", cfg.d_model)),
                "q": Site(topk_k(cfg, "attn_q", width)),
                "k": Site(topk_k(cfg, "attn_k", width)),
                "v": Site(topk_k(cfg, "attn_v", width)),
                "out": Site(topk_k(cfg, "attn_out", cfg.d_model)),
            }
        )
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


def attention_with_sink(q, k, v, sink):
    """Causal softmax attention with one extra zero key/value slot per head, scored by `sink`.

    The slot is prepended as key/value position 0; an additive float mask gives it the logit sink[h] (q·0 = 0)
    and applies the causal mask to the real positions. Gradients reach `sink` through the mask.
    """
    B, H, T, D = q.shape
    zero = q.new_zeros(B, H, 1, D)
    k, v = torch.cat([zero, k], dim=2), torch.cat([zero, v], dim=2)
    causal = torch.full((T, T), float("-inf"), device=q.device).triu(1)
    mask = torch.cat([sink.view(H, 1, 1).expand(H, T, 1), causal.expand(H, T, T)], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.act = nn.GELU() if cfg.activation == Activation.gelu else nn.ReLU()
        self.c_proj = nn.Linear(cfg.d_mlp, cfg.d_model)
        self.sites = nn.ModuleDict(
            {
                "in": Site(topk_k(cfg, "mlp_in", cfg.d_model)),
                "neuron": Site(topk_k(cfg, "mlp_neuron", cfg.d_mlp)),
                "out": Site(topk_k(cfg, "mlp_out", cfg.d_model)),
            }
        )

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
        self.sites = nn.ModuleDict({"resid_pre": Site(), "resid_mid": Site(), "resid_post": Site()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sites["resid_pre"](x)
        x = self.sites["resid_mid"](x + self.attn(self.norm1(x)))
        return self.sites["resid_post"](x + self.mlp(self.norm2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        unknown = set(cfg.topk_sites) - set(TOPK_SITES)
        if unknown:
            raise ValueError(f"model.topk_sites: unknown site(s) {sorted(unknown)}; choose from {list(TOPK_SITES)}")
        if cfg.d_model % cfg.d_head:
            raise ValueError(f"model.d_model={cfg.d_model} must be a multiple of model.d_head={cfg.d_head}")
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
            for prefix, owner in ((f"{i}", block), (f"{i}.attn", block.attn), (f"{i}.mlp", block.mlp)):
                for key, site in owner.sites.items():
                    site.name = f"{prefix}.{key}"
                    self.sites[site.name] = site
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name == "bigram":
                p.uniform_(0, 1).mul_(0.02)
            elif name.endswith("c_proj.weight"):
                # Residual-writing projections are scaled down with depth (GPT-2).
                p.normal_(0, std / math.sqrt(2 * self.cfg.n_layer))
            elif name.endswith("bias"):
                p.zero_()
            elif p.dim() >= 2:
                p.normal_(0, std)
            elif "norm" in name:
                p.fill_(1.0)
            else:  # attention sink logits
                p.zero_()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, last: torch.Tensor | None = None):
        """idx: [B, T] token ids. Returns (logits [B, T, vocab], loss or None).

        With `last` [B] (a position per row), only those positions reach the unembedding: logits are [B, vocab].
        """
        T = idx.shape[1]
        if T > self.cfg.ctx_len:
            raise ValueError(f"sequence length {T} exceeds model.ctx_len={self.cfg.ctx_len}")
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
