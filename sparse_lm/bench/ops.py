"""`python -m sparse_lm.bench` (mode=ops): time each sparse op against its references on the same inputs.

    python -m sparse_lm.bench                      # SpMM forward / dX / layer step, selection, AbsTopK
    python -m sparse_lm.bench densities=[0.01] tokens=16384 shapes=[[4096,1024]]

Ratios are dense time / backend time, measured side by side. On a CPU the reference backends run at small
shapes (the Triton kernels need CUDA there). Writes table.txt, results.json and a PNG to the run directory.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kernels.crossover import layer_ops, random_sparse_weight
from kernels.runtime import time_ms
from sparse_lm.config import BenchConfig
from kernels.reference import projection_mask

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def flops_and_bytes(op: str, impl: str, shape, nnz: int, tokens: int, elem: int) -> tuple[float, float]:
    """Useful FLOPs (2 per multiply-add the backend must do) and the fewest bytes it must move."""
    out, inp = shape
    weights = out * inp * elem if impl == "dense" else nnz * (elem + 2) + (out + inp) * 4
    if op == "forward":
        mults, moved = (out * inp if impl == "dense" else nnz), tokens * (inp + out) * elem + weights
    elif op == "dx":
        mults, moved = (out * inp if impl == "dense" else nnz), tokens * (inp + out) * elem + weights
    elif op == "step":
        mults = (3 if impl == "dense" else 1) * out * inp + (0 if impl == "dense" else 2 * nnz)
        moved = 3 * tokens * (inp + out) * elem + 2 * weights
    else:  # rebuild: read W twice (fp32), write both copies
        return 0.0, 2 * out * inp * 4 + 2 * nnz * (elem + 2)
    return 2.0 * tokens * mults, moved


def bench_spmm(cfg: BenchConfig, device, cuda: bool) -> list[dict]:
    dtype = DTYPES[cfg.dtype] if cuda else torch.float32
    tokens, shapes = (cfg.tokens, cfg.shapes) if cuda else (cfg.cpu_tokens, cfg.cpu_shapes)
    backends = ["dense", "torch_sparse", "triton"] if cuda else ["dense", "torch_sparse"]
    rows = []
    for shape in shapes:
        for density in cfg.densities:
            w = random_sparse_weight(shape, density, device)
            nnz = int((w != 0).sum())
            ops = layer_ops(w, tokens, dtype, backends)
            rel_err = {}
            if "triton" in ops:  # the kernel must agree with cuBLAS to bf16 precision
                ref, got = ops["dense"]["forward"]().float(), ops["triton"]["forward"]().float()
                rel_err = {"forward_rel_err": float((got - ref).norm() / ref.norm())}
            dense_ms = {}
            for impl, o in ops.items():
                for op, fn in o.items():
                    row = {"op": op, "shape": list(shape), "density": density, "backend": impl, "tokens": tokens}
                    row.update(rel_err if impl == "triton" else {})
                    try:
                        ms = time_ms(fn, cuda, cfg.warmup_ms, cfg.rep_ms)
                    except Exception as e:  # e.g. a dtype cuSPARSE lacks: report it, keep going
                        rows.append({**row, "error": f"{type(e).__name__}: {e}"[:200]})
                        continue
                    if impl == "dense":
                        dense_ms[op] = ms
                    flops, moved = flops_and_bytes(op, impl, shape, nnz, tokens, torch.finfo(dtype).bits // 8)
                    rows.append({**row, "ms": ms, "speedup": dense_ms.get(op, float("nan")) / ms,
                                 "tflops": flops / ms / 1e9, "gbps": moved / ms / 1e6})
            del ops
            print_progress(f"spmm {shape[0]}x{shape[1]} density {density}")
    return rows


def bench_select(cfg: BenchConfig, device, cuda: bool) -> list[dict]:
    """The weight projection's selection on one matrix, j = 4 per row, against torch.topk / kthvalue / reference."""
    shape = cfg.select_shape if cuda else cfg.cpu_select_shape
    w = torch.randn(*shape, device=device)
    n, k = w.numel(), math.floor(cfg.select_density * w.numel())
    flat = w.abs().flatten()
    fns = {
        "torch.topk": lambda: flat.topk(k, sorted=False),
        "torch.kthvalue": lambda: flat.kthvalue(n - k + 1),
        "reference projection": lambda: projection_mask(w, k, 4, 0),
    }
    ref = projection_mask(w, k, 4, 0)
    extra = {}
    if cuda:
        from kernels.select import select_topk

        _, thr = select_topk(w, k, 4, 0)
        moved = w + 1e-4 * torch.randn_like(w)  # the next step's weights: the warm start applies
        _, thr_moved = select_topk(moved, k, 4, 0)
        fns["radix select (cold)"] = lambda: select_topk(w, k, 4, 0)
        fns["radix select (warm)"] = lambda: select_topk(moved, k, 4, 0, warm=thr)
        extra["identical_survivors"] = bool(torch.equal(select_topk(w, k, 4, 0)[0], ref))
        extra["identical_survivors_warm"] = bool(
            torch.equal(select_topk(moved, k, 4, 0, warm=thr_moved)[0], projection_mask(moved, k, 4, 0))
        )
    rows = []
    for name, fn in fns.items():
        ms = time_ms(fn, cuda, cfg.warmup_ms, cfg.rep_ms)
        rows.append({"op": "select", "shape": list(shape), "k": k, "backend": name, "ms": ms, "gbps": n * 4 / ms / 1e6, **extra})
    base = next(r["ms"] for r in rows if r["backend"] == "torch.topk")
    for r in rows:
        r["speedup_vs_topk"] = base / r["ms"]
    print_progress("selection")
    return rows


def bench_abstopk(cfg: BenchConfig, device, cuda: bool) -> list[dict]:
    from sparse_lm.model import abstopk as reference

    dtype = DTYPES[cfg.dtype] if cuda else torch.float32
    tokens, dims = (cfg.tokens, cfg.abstopk_dims) if cuda else (cfg.cpu_tokens, cfg.cpu_abstopk_dims)
    rows = []
    for d in dims:
        k = math.floor(cfg.afrac * d)
        x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn_like(x)
        impls = {"torch.topk + scatter": reference}
        if cuda:
            from kernels.abstopk import abstopk

            impls["fused"] = abstopk
        ref_out = reference(x, k)
        for name, fn in impls.items():
            extra = {}
            if name == "fused":  # bf16 has tied magnitudes: compare the kept values, sorted, per row
                out = fn(x, k)
                extra["identical_rows"] = float((out == ref_out).all(-1).float().mean())
                extra["same_kept_magnitudes"] = bool(torch.equal(out.abs().sort(-1).values, ref_out.abs().sort(-1).values))
            fwd = time_ms(lambda: fn(x, k), cuda, cfg.warmup_ms, cfg.rep_ms)
            both = time_ms(lambda: torch.autograd.grad(fn(x, k), x, g), cuda, cfg.warmup_ms, cfg.rep_ms)
            rows.append({"op": "abstopk", "shape": [tokens, d], "k": k, "backend": name, "ms": fwd, "ms_fwd_bwd": both,
                         "gbps": 2 * x.numel() * x.element_size() / fwd / 1e6, **extra})
        base = rows[-len(impls)]
        for r in rows[-len(impls):]:
            r["speedup"], r["speedup_fwd_bwd"] = base["ms"] / r["ms"], base["ms_fwd_bwd"] / r["ms_fwd_bwd"]
        print_progress(f"abstopk d={d}")
    return rows


def print_progress(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] measured {what}", flush=True)


def format_table(rows: list[dict], base: str) -> str:
    """One line per measurement; `speed-up` is the time of `base` over this one's."""
    lines = [f"{'op':<8} {'shape':>11} {'density':>8} {'backend':<22} {'ms':>9} {'speed-up':>9} {'TFLOP/s':>8} {'GB/s':>8}   (1.00x = {base})"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        if "error" in r:
            lines.append(f"{r['op']:<8} {shape:>11} {r.get('density', ''):>8} {r['backend']:<22} {r['error']}")
            continue
        ratio = r.get("speedup", r.get("speedup_vs_topk", float("nan")))
        ratio = f"{ratio:.2f}x" if math.isfinite(ratio) else "-"
        tflops = f"{r['tflops']:.3g}" if "tflops" in r and r["tflops"] else "-"
        lines.append(
            f"{r['op']:<8} {shape:>11} {r.get('density', ''):>8} {r['backend']:<22} {r['ms']:>9.3f} {ratio:>9} "
            f"{tflops:>8} {r.get('gbps', 0):>8.3g}"
        )
    return "\n".join(lines)


def plot_speedups(rows: list[dict], out: Path) -> None:
    """Speed-up over dense against density, one panel per op, one line per (shape, backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ops = ["forward", "dx", "step"]
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), sharey=True)
    for ax, op in zip(axes, ops):
        series = {}
        for r in rows:
            if r.get("op") == op and r.get("backend") not in (None, "dense") and "ms" in r:
                series.setdefault((tuple(r["shape"]), r["backend"]), []).append((r["density"], r["speedup"]))
        for (shape, backend), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if backend == "triton" else "s--",
                    label=f"{backend} {shape[0]}x{shape[1]}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="density", title=f"{op}: speed-up over dense")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def environment(device: torch.device) -> dict:
    import triton

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }


def run_ops(cfg: BenchConfig, device: torch.device, out_dir: Path) -> dict:
    cuda = device.type == "cuda"
    result = {"env": environment(device), "config": OmegaConf.to_container(OmegaConf.structured(cfg))}
    result["spmm"] = bench_spmm(cfg, device, cuda)
    result["select"] = bench_select(cfg, device, cuda)
    result["abstopk"] = bench_abstopk(cfg, device, cuda)
    bases = {"spmm": "dense (cuBLAS on GPU)", "select": "torch.topk", "abstopk": "torch.topk + scatter"}
    table = "\n\n".join(format_table(result[key], base) for key, base in bases.items())
    header = f"{result['env']['device']} | torch {result['env']['torch']} | triton {result['env']['triton']} | {result['env']['date']}"
    (out_dir / "table.txt").write_text(header + "\n" + table + "\n")
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    plot_speedups(result["spmm"], out_dir / "speedup.png")
    print(header)
    print(table)
    print(f"\nwrote {out_dir}/table.txt, results.json, speedup.png")
    return result
