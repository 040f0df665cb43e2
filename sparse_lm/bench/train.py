"""`python -m sparse_lm.bench mode=train`: whole training steps, one run per kernels setting, in one process.

Each setting builds the same model (same seed) with the trainer's own code on synthetic tokens, jumps to the
final density (projection at the end of the anneal) and times `train_steps` optimizer steps: tokens/s and peak
memory. Then each trains `compare_steps` steps from scratch (a schedule of that length: dense, anneal, sparse)
and the per-step losses are compared with the first setting's.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose

from sparse_lm.config import BenchConfig, Config, to_object
from sparse_lm.data.cache import TokenData
from sparse_lm.distributed import Dist
from sparse_lm.trainer import build_run, check_config, train_step


def synthetic_data(vocab: int, n_tokens: int = 2_000_000) -> TokenData:
    tokens = np.random.default_rng(0).integers(0, vocab, n_tokens, dtype=np.uint16)
    meta = {"vocab_size": vocab, "tokenizer_hash": "synthetic", "corpus_hash": "synthetic",
            "train": {"tokens": n_tokens, "bytes": n_tokens}, "val": {"tokens": 0, "bytes": 0}}
    return TokenData(Path(tempfile.gettempdir()), meta, tokens, tokens[:0])


def new_run(cfg: Config, device: torch.device):
    dist = Dist(device=device)
    return build_run(cfg, Path(tempfile.mkdtemp(prefix="bench-")), dist, synthetic_data(cfg.model.vocab_size), check_config(cfg, dist))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_final_density(cfg: Config, device: torch.device, steps: int) -> dict:
    run = new_run(cfg, device)
    run.step = math.ceil(cfg.sparsity.anneal_end * cfg.train.max_steps)  # the anneal is over from here on
    plan = run.sparsifier.plan(run.step)
    run.sparsifier.apply(plan)
    run.accel.after_step(plan)
    for _ in range(3):
        train_step(run)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss, _ = train_step(run)
    sync(device)
    elapsed = time.perf_counter() - t0
    modes = sorted(set(run.accel.modes().values())) or ["dense"]
    return {
        "tokens_per_sec": steps * run.tokens_per_step / elapsed,
        "ms_per_step": elapsed / steps * 1e3,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "density": plan.density["hidden"],
        "matmul_modes": modes,
        "loss": loss.item(),
    }


def losses_from_scratch(cfg: Config, device: torch.device, steps: int) -> list[float]:
    cfg.train.max_steps = steps
    run = new_run(cfg, device)
    return [train_step(run)[0].item() for _ in range(steps)]


def run_training(bench: BenchConfig, device: torch.device, out_dir: Path) -> dict:
    from sparse_lm.bench.ops import environment

    cuda = device.type == "cuda"
    overrides = (bench.train_overrides if cuda else bench.cpu_train_overrides) + [f"train.device={device}"]
    settings = bench.train_kernels if cuda else bench.cpu_train_kernels
    compare = bench.compare_steps if cuda else bench.cpu_compare_steps
    results = {"env": environment(device), "overrides": overrides, "settings": {}}
    for setting in settings:
        cfg = to_object(compose("config", overrides=overrides + setting.split()))
        row = time_final_density(cfg, device, bench.train_steps)
        if compare:
            row["losses"] = losses_from_scratch(cfg, device, compare)
        results["settings"][setting] = row
        print(f"[{time.strftime('%H:%M:%S')}] {setting}: {row['tokens_per_sec']:,.0f} tokens/s at density {row['density']:.4g}", flush=True)
        if cuda:
            torch.cuda.empty_cache()
    first = results["settings"][settings[0]]
    lines = [f"{results['env']['device']} | {' '.join(overrides)} | {results['env']['date']}",
             f"{'setting':<34} {'tokens/s':>10} {'vs first':>9} {'ms/step':>9} {'peak GB':>8} {'max |Δloss|':>12}  matmuls"]
    for setting, row in results["settings"].items():
        row["speedup"] = row["tokens_per_sec"] / first["tokens_per_sec"]
        if compare:
            row["max_loss_diff"] = max(abs(a - b) for a, b in zip(row["losses"], first["losses"]))
        peak = f"{row['peak_memory_gb']:.1f}" if row["peak_memory_gb"] is not None else "-"
        diff = f"{row['max_loss_diff']:.4f}" if compare else "-"
        lines.append(f"{setting:<34} {row['tokens_per_sec']:>10,.0f} {row['speedup']:>8.2f}x {row['ms_per_step']:>9.1f} "
                     f"{peak:>8} {diff:>12}  {','.join(row['matmul_modes'])}")
    table = "\n".join(lines)
    (out_dir / "table.txt").write_text(table + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    if compare:
        plot_losses(results, out_dir / "train.png")
    print(table)
    print(f"\nwrote {out_dir}/table.txt, results.json" + (", train.png" if compare else ""))
    return results


def plot_losses(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for setting, row in results["settings"].items():
        left.plot(range(1, len(row["losses"]) + 1), row["losses"], lw=1, label=setting)
    left.set(title="loss from scratch", xlabel="step", ylabel="nats/token")
    left.legend(fontsize=8)
    names = list(results["settings"])
    right.bar(names, [results["settings"][n]["tokens_per_sec"] for n in names])
    right.set(title="tokens/s at the final density")
    right.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
