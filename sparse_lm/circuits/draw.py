"""Pictures of a circuit: a PNG and one self-contained HTML page (inline SVG and script, nothing downloaded).

Rows from bottom to top follow the forward pass: the task's tokens, the residual channels their embeddings
reach the circuit through, then only the sites the circuit uses (a layer's attention read, q, k, v, write, MLP
read, neurons, write), then the residual channels the answers' unembeddings read, and the two answers. A dot is a
kept node, placed by its channel index (so a residual channel sits at the same x in every read and write row) and
labelled with it. A line is an edge: blue for a positive weight, red for a negative one, thicker for a larger
|weight| (relative within its kind); dotted lines pair a q channel with the k channel it is dotted with.
On the page, pointing at or clicking a node opens a panel with its mean activation, its top-activating
pretraining contexts (the activating token marked) and how much the task loss changes when it alone is ablated
from the circuit; pointing at an edge shows its weight.
"""

from __future__ import annotations

import html
import json
import math
import re

from sparse_lm.circuits.edges import Edge
from sparse_lm.roles import SITES, site_name

NODE = re.compile(r"^(.*)\[(\d+)\]$")


def layout(n_layer: int, dims: dict[str, int], edges: list[Edge], kept: dict[str, list[int]]):
    """(rows: [(y, label)], positions: {node label: (x, y)}) with x, y in [0, 1]; only rows with nodes are drawn."""
    sites = [site_name(layer, s) for layer in range(n_layer) for s in SITES if site_name(layer, s) in kept]
    kinds = {e.kind for e in edges}
    row_names = ["tokens"] * ("embedding" in kinds) + ["embedding"] * ("embedding" in kinds) + sites
    row_names += ["unembedding", "answers"] if "unembedding" in kinds else []
    y = {name: (i + 0.5) / len(row_names) for i, name in enumerate(row_names)}
    pos = {}
    for site, channels in kept.items():
        for c in channels:
            pos[f"{site}[{c}]"] = ((c + 0.5) / dims[site], y[site])
    tokens = sorted({e.src for e in edges if e.kind == "embedding"})
    answers = sorted({e.dst for e in edges if e.kind == "unembedding"})
    for row, names in (("tokens", tokens), ("answers", answers)):
        for i, name in enumerate(names):
            pos[name] = ((i + 0.5) / len(names), y[row])
    d_model = dims.get("0.attn.in", 1)
    for e in edges:
        if e.kind in ("embedding", "unembedding"):  # residual channels where the circuit meets wte / lm_head
            node = e.dst if e.kind == "embedding" else e.src
            row, r = NODE.match(node).groups()
            pos[node] = ((int(r) + 0.5) / d_model, y[row])
    return [(y[n], n) for n in row_names], pos


def text_labels(pos: dict) -> dict[str, str]:
    """Text beside every dot: a token or an answer, or a node's channel index."""
    out = {}
    for name in pos:
        match = NODE.match(name)
        out[name] = match.group(2) if match else name.split(" ", 1)[1]
    return out


def _style(edges: list[Edge]):
    """(colour, width, opacity) per edge: width by |w| relative to the largest of its kind."""
    biggest: dict[str, float] = {}
    for e in edges:
        biggest[e.kind] = max(biggest.get(e.kind, 0.0), abs(e.weight))
    for e in edges:
        rel = abs(e.weight) / (biggest[e.kind] or 1.0)
        faint = 0.35 if e.kind in ("embedding", "unembedding") else 1.0  # many, and less telling than the inside
        yield e, ("#2166ac" if e.weight >= 0 else "#b2182b"), (0.4 + 2.6 * rel) * faint, (0.25 + 0.65 * rel) * faint


def draw_png(path, title: str, n_layer: int, dims: dict[str, int], edges: list[Edge], kept: dict[str, list[int]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, pos = layout(n_layer, dims, edges, kept)
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.5 * len(rows)))
    for y, name in rows:
        ax.axhline(y, color="#eeeeee", lw=0.6, zorder=0)
        ax.text(-0.01, y, name, ha="right", va="center", fontsize=8)
    for e, colour, width, alpha in _style(edges):
        (x0, y0), (x1, y1) = pos[e.src], pos[e.dst]
        ax.plot([x0, x1], [y0, y1], color=colour, lw=width * 0.6, alpha=alpha, ls=":" if e.kind == "attn.qk" else "-", zorder=1)
    xs, ys = zip(*pos.values()) if pos else ((), ())
    ax.scatter(xs, ys, s=10, color="black", zorder=2)
    for name, text in text_labels(pos).items():
        x, y = pos[name]
        token = name.startswith("token")
        ax.text(x, y - 0.2 / len(rows), text, ha="center", va="top", fontsize=5 if token else 5.5,
                rotation=90 if token else 0, color="#333333")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.3 / len(rows), 1), title=title)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PANEL_SCRIPT = """
const NODES = JSON.parse(document.getElementById('nodes').textContent);
function esc(s) { return s.replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c])); }
function show(name) {
  const n = NODES[name], panel = document.getElementById('panel');
  if (!n) return;
  let h = '<h3>' + esc(name) + '</h3><p>mean activation ' + (n.mean === null ? 'not finite' : n.mean.toFixed(4)) + '<br>loss change when ablated alone: ' +
    (n.effect === null ? 'not measured' : (n.effect >= 0 ? '+' : '') + n.effect.toFixed(4)) + '</p><p>top-activating contexts</p><ol>';
  for (const c of n.top) h += '<li><code>' + esc(c.before) + '<mark>' + esc(c.token) + '</mark>' + esc(c.after) +
    '</code> <small>' + (c.value === null ? '' : c.value.toFixed(3)) + '</small></li>';
  panel.innerHTML = h + '</ol>';
  panel.style.display = 'block';
}
for (const el of document.querySelectorAll('circle[data-node]')) {
  el.addEventListener('mouseenter', () => show(el.dataset.node));
  el.addEventListener('click', () => show(el.dataset.node));
}
if (location.hash.startsWith('#node=')) show(decodeURIComponent(location.hash.slice(6)));
"""


def finite(value):
    """`value` with every NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def draw_html(path, title: str, summary: list[tuple[str, str]], n_layer: int, dims: dict[str, int], edges: list[Edge],
              kept: dict[str, list[int]], nodes: dict[str, dict] | None = None) -> None:
    """`nodes`: per kept node label, {"mean", "top": [{"before", "token", "after", "value"}], "effect"} for its panel."""
    rows, pos = layout(n_layer, dims, edges, kept)
    W, left, top = 1000, 130, 16
    H = 2 * top + min(44 * len(rows), 880)  # one screen (1400 × 1000) with the title above, however many rows

    def xy(p):
        return left + p[0] * (W - left - 20), top + (1 - p[1]) * (H - 2 * top)

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">']
    for y, name in rows:
        _, py = xy((0, y))
        svg.append(f'<line x1="{left}" y1="{py:.1f}" x2="{W - 20}" y2="{py:.1f}" stroke="#eee"/>')
        svg.append(f'<text x="{left - 8}" y="{py + 4:.1f}" text-anchor="end">{html.escape(name)}</text>')
    for e, colour, width, alpha in _style(edges):
        (x0, y0), (x1, y1) = xy(pos[e.src]), xy(pos[e.dst])
        dash = ' stroke-dasharray="3,3"' if e.kind == "attn.qk" else ""
        svg.append(f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" stroke="{colour}" stroke-width="{width:.2f}" '
                   f'stroke-opacity="{alpha:.2f}"{dash}><title>{html.escape(f"{e.src} → {e.dst}  w={e.weight:+.4g}  ({e.kind})")}</title></line>')
    for name, text in text_labels(pos).items():
        x, y = xy(pos[name])
        is_node = name in (nodes or {})
        attrs = f' data-node="{html.escape(name)}" style="cursor:pointer"' if is_node else ""
        svg.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{4.5 if is_node else 3.5}" fill="black"{attrs}><title>{html.escape(name)}</title></circle>')
        svg.append(f'<text x="{x:.1f}" y="{y + 14:.1f}" text-anchor="middle" font-size="8" fill="#444">{html.escape(text)}</text>')
    svg.append("</svg>")
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary)
    data = json.dumps(finite(nodes or {}), allow_nan=False).replace("<", "\\u003c")  # no markup inside the script element
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:12px}} h2{{font-size:16px;margin:0 0 6px}} th{{text-align:left;padding-right:12px}}
td,th{{font-size:12px}} #panel{{display:none;position:fixed;top:12px;right:12px;width:380px;max-height:90vh;overflow:auto;
background:#fff;border:1px solid #999;padding:8px;font-size:12px;box-shadow:0 2px 8px #0003}} mark{{background:#ffd54f}}
code{{white-space:pre-wrap}}</style></head>
<body><h2>{html.escape(title)}</h2>{''.join(svg)}<div id="panel"></div>
<table>{table}</table>
<p style="max-width:900px;font-size:12px">{html.escape(__doc__.split(chr(10), 2)[2].replace(chr(10), " "))}</p>
<script type="application/json" id="nodes">{data}</script><script>{PANEL_SCRIPT}</script></body></html>"""
    with open(path, "w") as f:
        f.write(page)
