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


def versus_circuit(report: dict, path: Path) -> None:
    """Per matrix: each subcomponent's task importance against its squared weight on the circuit's entries (the
    matrix's own share and the share of entries as lines); then the task loss under each ablation (circuit.py)."""
    plt = _plt()
    mats = report["matrices"]
    fig, axes = plt.subplots(1, len(mats) + 1, figsize=(4.6 * (len(mats) + 1), 4))
    for ax, (name, m) in zip(axes, mats.items()):
        imp, share = torch.tensor(m["task_importance"]), torch.tensor(m["circuit_share"])
        in_h = torch.zeros(len(imp), dtype=torch.bool)
        in_h[m["task_set"]] = True
        ax.scatter(imp[~in_h], share[~in_h], s=8, c="0.6", label="other subcomponents")
        ax.scatter(imp[in_h], share[in_h], s=14, c="C3", label=f"task set H ({int(in_h.sum())})")
        ax.axhline(m["share_target"], color="C0", ls="--", lw=1, label=f"the matrix itself ({m['share_target']:.3f})")
        ax.axhline(m["share_entries"], color="k", ls=":", lw=1, label=f"share of entries ({m['share_entries']:.3f})")
        ax.axvline(report["threshold"], color="0.3", lw=0.5)
        ax.set_xlabel("task importance (mean over contexts of the max CI)")
        ax.set_ylabel(f"squared weight on circuit entries ({m['circuit_rows']}×{m['circuit_cols']})")
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, max(0.1, 1.15 * float(share.max())))
        ax.legend(fontsize=7)
    ax = axes[-1]
    ab = report["ablation"]
    names = list(ab)
    y = range(len(names))
    losses = [ab[k]["loss"] for k in names]
    err = [[max(0.0, ab[k]["loss"] - ab[k].get("min", ab[k]["loss"])) for k in names],
           [max(0.0, ab[k].get("max", ab[k]["loss"]) - ab[k]["loss"]) for k in names]]
    colors = ["0.5" if "random" in k else ("C3" if "H" in k else "C0") for k in names]
    ax.barh(list(y), losses, xerr=err, color=colors)
    ax.set_yticks(list(y), names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(ab["whole model"]["loss"], color="k", lw=0.5)
    ax.set_xlabel(f"held-out task loss per side ({report['task']})")
    ax.set_title(f"ablations in this MLP ({report['circuit_neurons']} circuit neurons; grey: random, min–max)", fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
