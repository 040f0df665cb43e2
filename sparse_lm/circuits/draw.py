"""Pictures of a circuit: a PNG and one self-contained HTML page (inline SVG, no scripts or downloads).

Rows from bottom to top follow the forward pass: the task's tokens, the residual channels their embeddings
reach the circuit through, then per layer the attention's read, q, k, v, write, the MLP's read, neurons and
write, then the residual channels the answers' unembeddings read, and the two answers. A dot is a kept node, placed by its channel index
(so a residual channel sits at the same x in every read and write row). A line is an edge: blue for a
positive weight, red for a negative one, thicker for a larger |weight| (relative within its kind); dotted
lines pair a q channel with the k channel it is dotted with.
"""

from __future__ import annotations

import html
import re

from sparse_lm.circuits.edges import Edge
from sparse_lm.roles import SITES, site_name

NODE = re.compile(r"^(.*)\[(\d+)\]$")


def layout(n_layer: int, dims: dict[str, int], edges: list[Edge], kept: dict[str, list[int]]):
    """(rows: [(y, label)], positions: {node label: (x, y)}) with x, y in [0, 1]."""
    row_names = ["tokens", "embedding"] + [site_name(layer, s) for layer in range(n_layer) for s in SITES] + ["unembedding", "answers"]
    y = {name: i / (len(row_names) - 1) for i, name in enumerate(row_names)}
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
    """Text shown beside a dot: the answers always, the tokens only when few enough to read (their names are
    in the tooltips and the JSON anyway)."""
    tokens = [name for name in pos if name.startswith("token")]
    shown = [name for name in pos if name.startswith("answer")] + (tokens if len(tokens) <= 30 else [])
    return {name: name.split(" ", 1)[1] for name in shown}


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
    fig, ax = plt.subplots(figsize=(10, 2 + 0.32 * len(rows)))
    for y, name in rows:
        ax.axhline(y, color="#eeeeee", lw=0.6, zorder=0)
        ax.text(-0.01, y, name, ha="right", va="center", fontsize=7)
    for e, colour, width, alpha in _style(edges):
        (x0, y0), (x1, y1) = pos[e.src], pos[e.dst]
        ax.plot([x0, x1], [y0, y1], color=colour, lw=width * 0.6, alpha=alpha, ls=":" if e.kind == "attn.qk" else "-", zorder=1)
    xs, ys = zip(*pos.values()) if pos else ((), ())
    ax.scatter(xs, ys, s=10, color="black", zorder=2)
    for name, text in text_labels(pos).items():
        x, y = pos[name]
        above = name.startswith("answer")
        ax.text(x, y + (0.015 if above else -0.015), text, ha="center", va="bottom" if above else "top", fontsize=6)
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.05, 1.05), title=title)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_html(path, title: str, summary: list[tuple[str, str]], n_layer: int, dims: dict[str, int], edges: list[Edge],
              kept: dict[str, list[int]]) -> None:
    rows, pos = layout(n_layer, dims, edges, kept)
    W, H, left, top = 1100, 60 + 26 * len(rows), 150, 20

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
    labels = text_labels(pos)
    for name, p in pos.items():
        x, y = xy(p)
        svg.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="black"><title>{html.escape(name)}</title></circle>')
        if name in labels:
            dy = -8 if name.startswith("answer") else 16
            svg.append(f'<text x="{x:.1f}" y="{y + dy:.1f}" text-anchor="middle" font-size="9">{html.escape(labels[name])}</text>')
    svg.append("</svg>")
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:20px}} th{{text-align:left;padding-right:12px}} td,th{{font-size:13px}}</style></head>
<body><h2>{html.escape(title)}</h2><table>{table}</table>
<p style="max-width:900px;font-size:13px">{html.escape(__doc__.split(chr(10), 2)[2].replace(chr(10), " "))}
Hover over a dot or a line for its name and weight.</p>{''.join(svg)}</body></html>"""
    with open(path, "w") as f:
        f.write(page)
