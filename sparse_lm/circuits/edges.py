"""Edges of a circuit: nonzero weight entries that join two kept nodes.

Always counted, per layer:
  attn.qkv  c_attn[o, i]:       attn.in[i] → q/k/v[o]
  attn.out  attn c_proj[o, c]:  v[c] → attn.out[o] (the head's output channel c carries v channel c)
  mlp.in    c_fc[n, i]:         mlp.in[i] → mlp.neuron[n]
  mlp.out   mlp c_proj[o, n]:   mlp.neuron[n] → mlp.out[o]
Switchable conventions (stated with every count):
  qk_pairs     a kept q channel and the kept k channel it is dotted with (same index, same head) count as one edge
  embedding    wte[t, r] for the tokens t of the task's contexts and residual channels r some kept node reads
  unembedding  lm_head[a or b, r] for the two answers and residual channels r some kept node writes
  residual     each kept write to residual channel r and each later kept read of r count as one edge
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sparse_lm.config import EdgeConventions
from sparse_lm.roles import RESIDUAL_READS, RESIDUAL_WRITES, SITES, site_kind, site_name


def describe(conv: EdgeConventions) -> str:
    return ", ".join(f"{k}={'on' if v else 'off'}" for k, v in asdict(conv).items())


@dataclass
class Edge:
    src: str  # node label, e.g. "0.mlp.neuron[3]" or "token 'x'"
    dst: str
    weight: float
    kind: str


def _mask(kept: dict[str, list[int]], site: str, dim: int) -> torch.Tensor:
    m = torch.zeros(dim, dtype=torch.bool)
    m[kept.get(site, [])] = True
    return m


def mlp_matrix_sites(layer: int) -> dict[str, tuple[str, str, str]]:
    """Module name → (the site its rows feed, the site its columns read, edge kind) for one block's MLP matrices."""
    return {f"blocks.{layer}.mlp.c_fc": (site_name(layer, "mlp_neuron"), site_name(layer, "mlp_in"), "mlp.in"),
            f"blocks.{layer}.mlp.c_proj": (site_name(layer, "mlp_out"), site_name(layer, "mlp_neuron"), "mlp.out")}


def circuit_edges(weights: dict[str, torch.Tensor], n_layer: int, d_head: int, kept: dict[str, list[int]],
                  tokens: list[int], answers: tuple[int, int], conv: EdgeConventions, token_text=str) -> list[Edge]:
    """Every edge of the circuit `kept` (site → kept channel indices) under `conv`."""
    edges: list[Edge] = []

    def matrix(w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, src: str, dst: str, kind: str, col_offset=0, row_offset=0):
        sub = w * rows[:, None] * cols[None, :]
        for o, i in (sub != 0).nonzero().tolist():
            edges.append(Edge(f"{src}[{i - col_offset}]", f"{dst}[{o - row_offset}]", float(w[o, i]), kind))

    d_model = weights["wte.weight"].shape[1]
    for layer in range(n_layer):
        p = f"blocks.{layer}."
        c_attn = weights[p + "attn.c_attn.weight"]
        width = c_attn.shape[0] // 3
        site = {kind: site_name(layer, kind) for kind in SITES}
        read_attn = _mask(kept, site["attn_in"], d_model)
        q, k, v = (_mask(kept, site[s], width) for s in ("attn_q", "attn_k", "attn_v"))
        for part, (name, m) in enumerate((("attn_q", q), ("attn_k", k), ("attn_v", v))):
            rows = torch.zeros(3 * width, dtype=torch.bool)
            rows[part * width : (part + 1) * width] = m
            matrix(c_attn, rows, read_attn, site["attn_in"], site[name], "attn.qkv", row_offset=part * width)
        if conv.qk_pairs:
            for c in (q & k).nonzero().flatten().tolist():
                edges.append(Edge(f"{site['attn_q']}[{c}]", f"{site['attn_k']}[{c}]", 1.0, "attn.qk"))
        matrix(weights[p + "attn.c_proj.weight"], _mask(kept, site["attn_out"], d_model), v, site["attn_v"], site["attn_out"], "attn.out")
        for module, (rows, cols, kind) in mlp_matrix_sites(layer).items():
            w = weights[module + ".weight"]
            matrix(w, _mask(kept, rows, w.shape[0]), _mask(kept, cols, w.shape[1]), cols, rows, kind)

    residual_order = [site_name(layer, s) for layer in range(n_layer) for s in SITES if s in RESIDUAL_READS + RESIDUAL_WRITES]
    read = torch.zeros(d_model, dtype=torch.bool)  # residual channels some kept node reads
    written = torch.zeros(d_model, dtype=torch.bool)  # ... and writes
    for layer in range(n_layer):
        for s in RESIDUAL_READS:
            read |= _mask(kept, site_name(layer, s), d_model)
        for s in RESIDUAL_WRITES:
            written |= _mask(kept, site_name(layer, s), d_model)
    if conv.embedding:
        wte = weights["wte.weight"]
        for t in sorted(set(tokens)):
            for r in (read & (wte[t] != 0)).nonzero().flatten().tolist():
                edges.append(Edge(f"token {token_text(t)!r}", f"embedding[{r}]", float(wte[t, r]), "embedding"))
    if conv.unembedding:
        head = weights["lm_head.weight"]
        for a in answers:
            for r in (written & (head[a] != 0)).nonzero().flatten().tolist():
                edges.append(Edge(f"unembedding[{r}]", f"answer {token_text(a)!r}", float(head[a, r]), "unembedding"))
    if conv.residual:
        for i, w_site in enumerate(residual_order):
            if site_kind(w_site) not in RESIDUAL_WRITES:
                continue
            for r in kept.get(w_site, []):
                for r_site in residual_order[i + 1 :]:
                    if site_kind(r_site) in RESIDUAL_READS and r in kept.get(r_site, []):
                        edges.append(Edge(f"{w_site}[{r}]", f"{r_site}[{r}]", 1.0, "residual"))
    return edges


def count_by_kind(edges: list[Edge]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in edges:
        counts[e.kind] = counts.get(e.kind, 0) + 1
    counts["total"] = len(edges)
    return counts
