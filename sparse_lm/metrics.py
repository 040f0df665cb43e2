"""What a run writes for people to read: console progress, metrics.jsonl, TensorBoard, and a curves picture.

Only the main process writes. On resume, rows and events past the resumed step (written by the interrupted
run after its last checkpoint) are dropped, so the files read like one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from sparse_lm.fsutil import atomic_file, write_text

log = logging.getLogger("sparse_lm")


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Throughput:
    """Tokens/s over the steps since the last restart, and an ETA from this process's average step time."""

    def __init__(self, start_step: int):
        self.start_step, self.t_begin = start_step, time.time()
        self.restart()

    def restart(self) -> None:
        self.t, self.steps = time.time(), 0

    def step(self) -> None:
        self.steps += 1

    def tokens_per_sec(self, tokens_per_step: int) -> float:
        return self.steps * tokens_per_step / max(time.time() - self.t, 1e-9)

    def elapsed(self) -> float:
        return time.time() - self.t_begin

    def eta(self, step: int, max_steps: int) -> float:
        return self.elapsed() / max(1, step - self.start_step) * (max_steps - step)


class RunLogger:
    def __init__(self, run_dir: Path, start_step: int, max_steps: int, enabled: bool):
        self.enabled, self.max_steps = enabled, max_steps
        self.path = Path(run_dir) / "metrics.jsonl"
        self.run_dir = Path(run_dir)
        self.tb = None
        if not enabled:
            return
        self._truncate_after(start_step)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events an interrupted attempt wrote beyond the step we start from.
        self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)

    def _truncate_after(self, step: int) -> None:
        if self.path.exists():
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in read_metrics(self.path) if r["step"] <= step))

    def write(self, row: dict, scalars: dict[str, float] | None = None) -> None:
        """Append one JSON row (must hold `step`) and its TensorBoard scalars."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in (scalars or {}).items():
            if value is not None and math.isfinite(value):
                self.tb.add_scalar(key, value, row["step"])

    def progress(self, row: dict, eta: float) -> None:
        self.info(
            f"step {row['step']}/{self.max_steps} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | density {row['density']:.4f} | "
            f"{row['tokens_per_sec']:,.0f} tok/s | ETA {format_duration(eta)}"
        )

    def info(self, message: str) -> None:
        if self.enabled:
            log.info(message)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.enabled:
            plot_curves(self.path, self.run_dir / "curves.png")


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl; a last line cut short by a killed process is ignored."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return rows


def plot_curves(metrics_path: Path, out: Path) -> None:
    """Train/val loss, learning rate and density against step, as one PNG."""
    if not Path(metrics_path).exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    if not train:
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if val:
        axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val", ms=3)
    axes[0].set(title="loss (nats/token)", xlabel="step")
    axes[0].legend()
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[1].set(title="learning rate", xlabel="step")
    axes[2].plot([r["step"] for r in train], [r["density"] for r in train])
    axes[2].set(title="hidden-matrix density", xlabel="step", yscale="log")
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
