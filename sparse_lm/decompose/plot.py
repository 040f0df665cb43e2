"""The decomposition's pictures: training curves; for a toy, each matrix's pieces against the ground truth and the
causal importances on one-hot inputs (subcomponents ordered by the feature they match, so a clean decomposition
shows an identity)."""

from __future__ import annotations

from pathlib import Path

import torch

from sparse_lm.decompose.metrics import cosines
from sparse_lm.fsutil import atomic_file


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves(history: list[dict], path: Path) -> None:
    plt = _plt()
    keys = [k for k in history[0] if k != "step" and isinstance(history[0][k], (int, float)) and "/" not in k]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    for k in keys:
        ax.plot(steps, [max(h[k], 1e-12) for h in history], marker="o", ms=3, label=k)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss term (before its coefficient)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def matched_order(score: torch.Tensor) -> list[int]:
    """Columns of score [F, C] ordered so that feature f's best match comes f-th (each used once), the rest after."""
    used, order = set(), []
    for f in range(score.shape[0]):
        for c in score[f].argsort(descending=True).tolist():
            if c not in used:
                used.add(c)
                order.append(c)
                break
    return order + [c for c in range(score.shape[1]) if c not in used]


def heatmaps(panels: list[tuple[str, torch.Tensor]], path: Path, cmap: str, xlabel: str, ylabel: str) -> None:
    """One [rows, columns] heatmap in [0, 1] per panel, side by side."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels):
        im = ax.imshow(values, vmin=0, vmax=1, cmap=cmap, aspect="auto")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def components(dec, truth: dict[str, torch.Tensor], path: Path) -> None:
    """Per matrix: |cosine| between every ground-truth piece (rows) and every learned piece (columns, matched first)."""
    panels = []
    for n in (n for n in dec.names if n in truth):
        cos = cosines(dec.component_weights(n).detach(), truth[n]).abs()
        panels.append((f"{n}: |cos| ground truth × learned", cos[:, matched_order(cos)[: cos.shape[0] + 10]]))
    heatmaps(panels, path, "viridis", "learned piece (matched first)", "ground-truth piece (feature)")


def importance(ci: dict[str, torch.Tensor], path: Path) -> None:
    """Causal importance of every subcomponent (columns, matched first) with one feature on (rows)."""
    panels = [(f"{n}: causal importance, one-hot inputs", g[:, matched_order(g)[: g.shape[0] + 10]]) for n, g in ci.items()]
    heatmaps(panels, path, "magma", "subcomponent (matched first)", "active feature")


def draw_all(dec, t, history: list[dict], out: Path) -> None:
    from sparse_lm.decompose.metrics import one_hot_importance
    from sparse_lm.decompose.spd import SPD

    if history:
        curves(history, out / "curves.png")
    if t.truth is not None:
        components(dec, t.truth, out / "components.png")
    if t.n_features and isinstance(dec, SPD):
        importance(one_hot_importance(dec, t.n_features), out / "importance.png")
