"""The frontier picture: validation loss against the geometric mean of circuit edges (log scale).

One curve per model size through its densities, the dense baselines as their own curve; error bars span the seeds
(loss: ± one standard deviation; edges: the seeds' smallest and largest score). A point none of whose seeds has a
passing circuit cannot sit on the edge axis: it is drawn hollow at the geometric mean over all of its circuits, passing
or not, when it has any, and listed below the plot otherwise.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from sparse_lm.circuits.battery import geometric_mean
from sparse_lm.frontier.table import PointRow, RunRow


def draw(pts: list[PointRow], rows: list[RunRow], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    curves = [(f"{kind}, size {size}", [p for p in pts if p.kind == kind and p.size == size], kind)
              for kind in ("sparse", "dense") for size in dict.fromkeys(p.size for p in pts if p.kind == kind)]
    unplaced = []
    for i, (label, members, kind) in enumerate(curves):
        color = f"C{i}"
        order = (lambda p: p.density) if kind == "sparse" else (lambda p: p.steps)  # along density / training length
        scored = sorted((p for p in members if p.gm_edges is not None and p.val_loss is not None), key=order)
        if scored:
            x = [p.gm_edges for p in scored]
            ax.errorbar(x, [p.val_loss for p in scored], yerr=[p.val_loss_sd or 0 for p in scored], ls="-" if kind == "sparse" else "--",
                        xerr=[[max(p.gm_edges - p.gm_edges_min, 0) for p in scored], [max(p.gm_edges_max - p.gm_edges, 0) for p in scored]],
                        fmt="o", color=color, capsize=3, label=label)
            for p in scored:
                ax.annotate(f"{p.density:g}" if p.kind == "sparse" else f"{p.steps} steps", (p.gm_edges, p.val_loss),
                            textcoords="offset points", xytext=(5, 4), fontsize=7, color=color)
        if not scored:  # the curve's colour still needs its name
            ax.plot([], [], "o", mfc="none", color=color, label=label)
        for p in members:
            if p.gm_edges is not None or p.val_loss is None:
                continue
            every = [e for r in rows if r.point == p.point for e in r.circuits.values()]
            if every:
                x = geometric_mean(every)
                ax.plot([x], [p.val_loss], "o", mfc="none", color=color)
                ax.annotate(f"{p.density:g}" if p.kind == "sparse" else f"{p.steps} steps", (x, p.val_loss),
                            textcoords="offset points", xytext=(5, 4), fontsize=7, color=color)
            else:
                unplaced.append(f"{p.point} ({p.val_loss:.3f})")
    ax.plot([], [], "o", mfc="none", color="gray", label="no passing circuit: mean over all its circuits")
    ax.set_xscale("log")
    ax.set_xlabel("geometric mean of circuit edges over tasks (log scale)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if not any(p.gm_edges is not None for p in pts):
        ax.text(0.5, 0.5, "no run has a circuit that passes its battery", transform=ax.transAxes, ha="center", color="gray")
    if unplaced:
        fig.text(0.01, 0.01, "no circuit at all (val loss): " + ", ".join(unplaced), fontsize=6, wrap=True)
    ax.legend(fontsize=7)
    losses = [p.val_loss for p in pts if p.val_loss is not None]
    if losses and statistics.pstdev(losses) == 0:
        ax.set_ylim(losses[0] - 0.1, losses[0] + 0.1)
    fig.tight_layout(rect=(0, 0.04 if unplaced else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
