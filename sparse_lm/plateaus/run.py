"""`python -m sparse_lm.plateaus`: the protocol on one model or several, with random-init controls, and the report.

    run(cfg) → every model (and its random-init copy) on the same prompts → plateaus.json, plateaus.csv,
               curves.png (KL along the sphere path, one band per direction, real and random bases), thresholds.png
               (histograms of the KL 0.5 threshold angle), summary.txt

The difference of differences: each model's gap (how many degrees earlier real-other directions cross KL 0.5 than
covariance-matched random ones, real bases, sphere path) and every pair's difference of gaps.
"""

from __future__ import annotations

import csv
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from sparse_lm import checkpoint
from sparse_lm.circuits.controls import random_init_model
from sparse_lm.circuits.report import fmt
from sparse_lm.cli import load_model
from sparse_lm.config import PlateausConfig
from sparse_lm.errors import UserError
from sparse_lm.fsutil import write_json, write_text
from sparse_lm.plateaus.protocol import DIRECTIONS, ModelResult, run_model

MAIN_LEVEL = "0.5"


def prompts_for(mcfg, tokenizer, state: dict, n: int, ctx: int) -> torch.Tensor:
    """n contexts of ctx tokens, evenly spaced over the validation split of the model's data."""
    from sparse_lm.data.cache import prepare

    data = prepare(mcfg.data, tokenizer if "converted_from" in state else None)
    val = np.asarray(data.val)
    chunks = (len(val) - 1) // ctx
    if chunks < 2:
        raise UserError(f"the validation split of {data.dir} has {len(val)} tokens: too few for two contexts of ctx={ctx}")
    starts = np.linspace(0, chunks - 1, min(n, chunks)).astype(np.int64) * ctx
    return torch.from_numpy(np.stack([val[s : s + ctx] for s in starts]).astype(np.int64))


def default_sites(model, cfg: PlateausConfig) -> tuple[str, str]:
    n_layer = model.cfg.n_layer
    site = cfg.site or ("1.resid_pre" if n_layer > 1 else "0.resid_pre")
    readout = cfg.readout or f"{n_layer - 1}.resid_post"
    for name, value in (("site", site), ("readout", readout)):
        if value not in model.sites:
            raise UserError(f"{name}={value}: no such site; sites look like {list(model.sites)[:11]}")
    return site, readout


def label_of(ckpt: Path, mcfg) -> str:
    run = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.name
    return f"{run} ({'sparse ' + format(mcfg.sparsity.hidden_density, 'g') if mcfg.sparsity.enabled else 'dense'}, " \
           f"topk {'on' if mcfg.model.topk_sites else 'off'})"


def all_models(cfg: PlateausConfig):
    """(label, model, mcfg, tokenizer, state) for every model asked for, random-init copies after each."""
    for path in [cfg.checkpoint, *cfg.compare]:
        ckpt = checkpoint.resolve(path)
        model, tok, mcfg, state = load_model(ckpt, cfg.device)
        model.requires_grad_(False)
        label = label_of(ckpt, mcfg)
        yield label, model, mcfg, tok, state
        if cfg.random_init:
            yield f"{label} random-init", random_init_model(mcfg, state["step"], cfg.seed, cfg.device), mcfg, tok, state


def output_dir(cfg: PlateausConfig) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir)
    return checkpoint.results_dir(checkpoint.resolve(cfg.checkpoint), "plateaus")


def differences(results: list[ModelResult], boot: int, seed: int) -> list[dict]:
    """For every pair of trained models, the later one's gap minus the earlier one's (the difference of
    differences), with an interval: in a 2×2 grid both the weight-sparsity and the AbsTopK contrasts are there."""
    trained = [r for r in results if not r.label.endswith("random-init")]
    out = []
    for first, other in ((x, y) for i, x in enumerate(trained) for y in trained[i + 1:]):
        a, b, c, d = (m.summary("real", direction, "sphere").hits(MAIN_LEVEL)
                      for m in (first, other) for direction in ("cov_random", "real_other"))
        g = torch.Generator().manual_seed(seed)

        def gap(x, y):
            tx, ty = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
            return tx[torch.randint(len(x), (boot, len(x)), generator=g)].mean(1) - ty[torch.randint(len(y), (boot, len(y)), generator=g)].mean(1)

        if min(map(len, (a, b, c, d))) == 0:
            out.append({"model": other.label, "against": first.label, "value": None, "why": "a direction never crosses"})
            continue
        dd = gap(c, d) - gap(a, b)
        value = (sum(c) / len(c) - sum(d) / len(d)) - (sum(a) / len(a) - sum(b) / len(b))
        out.append({"model": other.label, "against": first.label, "value": value,
                    "low": float(dd.quantile(0.025)), "high": float(dd.quantile(0.975))})
    return out


def summary_text(results: list[ModelResult], diffs: list[dict]) -> str:
    lines = [f"threshold where KL(start ‖ point) first reaches {MAIN_LEVEL} nats, sphere path (degrees), real bases: mean [95% "
             f"bootstrap] over the curves that cross (fraction crossing)"]
    head = f"{'model':<48} " + " ".join(f"{d:>24}" for d in DIRECTIONS)
    lines.append(head)
    for r in results:
        cells = []
        for d in DIRECTIONS:
            s = r.summary("real", d, "sphere")
            m, lo, hi = s.mean[MAIN_LEVEL]
            cells.append(f"{fmt(m, '{:.1f}')} [{fmt(lo, '{:.1f}')}, {fmt(hi, '{:.1f}')}] ({s.crossed[MAIN_LEVEL]:.2f})")
        lines.append(f"{r.label:<48} " + " ".join(f"{c:>24}" for c in cells))
    lines.append("")
    lines.append("gap: how many degrees earlier real-other directions cross than covariance-matched random ones [95% bootstrap]; "
                 "rank test on all curves (never crossing = latest): P(random later), p")
    for r in results:
        g, (pl, p) = r.gap[MAIN_LEVEL], r.rank[MAIN_LEVEL]
        lines.append(f"{r.label:<48} gap {fmt(g[0], '{:+.1f}')} [{fmt(g[1], '{:+.1f}')}, {fmt(g[2], '{:+.1f}')}]   "
                     f"P {fmt(pl, '{:.2f}')}, p {fmt(p, '{:.2g}')}   ({r.seconds:.0f}s, shrinkage {r.shrinkage:.2f})")
    low = min(results[0].plateau, key=float)
    lines.append("")
    lines.append(f"plateau: how many degrees later covariance-matched random directions reach KL {low} from real bases than from "
                 f"random bases [95% bootstrap]; KL at the end of the path (median, real bases), for models that never get there")
    for r in results:
        pm, plo, phi = r.plateau[low]
        s = r.summary("real", "cov_random", "sphere")
        lines.append(f"{r.label:<48} plateau {fmt(pm, '{:+.1f}')} [{fmt(plo, '{:+.1f}')}, {fmt(phi, '{:+.1f}')}]   KL at "
                     f"{s.curve_x[-1]:.0f}°: {s.curve_kl[1][-1]:.3f}")
    if diffs:
        lines.append("")
        lines.append("difference of differences (this model's gap − the other's gap, degrees):")
        for d in diffs:
            lines.append(f"{d['model']:<48} " + (f"{d['value']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}] against {d['against']}"
                                                  if d["value"] is not None else f"none: {d['why']}"))
    return "\n".join(lines)


def curves_csv(results: list[ModelResult]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "base", "direction", "path", "x", "curve", *[f"threshold_{lv}" for lv in results[0].summaries[0].thresholds]])
    for r in results:
        for s in r.summaries:
            levels = list(s.thresholds)
            for i in range(len(s.thresholds[levels[0]])):
                w.writerow([r.label, s.base, s.direction, s.path, s.x, i, *[s.thresholds[lv][i] for lv in levels]])
    return buf.getvalue()


def draw(results: list[ModelResult], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3 * len(results)), squeeze=False, sharey=True)
    for row, r in zip(axes, results):
        for ax, base in zip(row, ("real", "random")):
            for i, d in enumerate(DIRECTIONS):
                s = r.summary(base, d, "sphere")
                q25, q50, q75 = (np.array(q) for q in s.curve_kl)
                ax.plot(s.curve_x, q50, color=f"C{i}", label=d)
                ax.fill_between(s.curve_x, q25, q75, color=f"C{i}", alpha=0.2)
            ax.axhline(float(MAIN_LEVEL), color="gray", lw=0.5, ls="--")
            ax.set_yscale("symlog", linthresh=0.01)
            ax.set_title(f"{r.label}: {base} bases", fontsize=8)
            ax.set_xlabel("angle from the base about the mean (degrees, median over curves)")
        row[0].set_ylabel("KL(start ‖ point), nats")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], results):
        for i, d in enumerate(("real_other", "cov_random", "isotropic")):
            vals = r.summary("real", d, "sphere").hits(MAIN_LEVEL)
            ax.hist(vals, bins=20, range=(0, 180), alpha=0.5, color=f"C{DIRECTIONS.index(d)}", label=d)
        ax.set_title(r.label, fontsize=7)
        ax.set_xlabel(f"angle at KL {MAIN_LEVEL} (degrees)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "thresholds.png", dpi=110)
    plt.close(fig)


def run(cfg: PlateausConfig) -> list[ModelResult]:
    if MAIN_LEVEL not in map(str, cfg.levels):
        raise UserError(f"levels={cfg.levels}: must include {MAIN_LEVEL} (the threshold the report compares)")
    out = output_dir(cfg)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(f"out_dir {out} already holds results; choose another out_dir=..., or overwrite=true")
    results, prompts, shared = [], None, None
    for label, model, mcfg, tok, state in all_models(cfg):
        site, readout = default_sites(model, cfg)
        mine = prompts_for(mcfg, tok, state, cfg.n_prompts, cfg.ctx)
        if prompts is None:
            prompts, shared = mine, True
        elif not torch.equal(mine, prompts):
            shared = False  # another tokenizer or corpus: this model gets its own contexts
        print(f"{label}: {site} → {readout}, {len(mine)} contexts of {cfg.ctx} tokens", flush=True)
        results.append(run_model(label, model, site, readout, mine, cfg.n_bases, cfg.steps, cfg.levels, cfg.bootstrap, cfg.seed))
        print(f"  gap {fmt(results[-1].gap[MAIN_LEVEL][0], '{:+.1f}')} degrees ({results[-1].seconds:.0f}s)", flush=True)
    diffs = differences(results, cfg.bootstrap, cfg.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        from dataclasses import asdict

        write_json(staging / "plateaus.json", {"config": OmegaConf.to_container(OmegaConf.structured(cfg)), "same_prompts": shared,
                                                "models": [asdict(r) for r in results], "differences": diffs})
        write_text(staging / "plateaus.csv", curves_csv(results))
        text = summary_text(results, diffs)
        write_text(staging / "summary.txt", text + "\n")
        draw(results, staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(text)
    print(f"wrote {out}")
    return results

