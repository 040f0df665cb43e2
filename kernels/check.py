"""`python -m kernels.check`: are the kernels right, and fast enough? One process, one verdict per target.

    python -m kernels.check [--out DIR] [--no-step]

1. Correctness against torch references (kernels/reference.py, dense matmuls): SpMM forward and dX with a random
   dY, in a 16-bit type and fp32, odd sizes, token- and feature-major X, an undersized capacity; selection with the
   j rule, massive ties and a warm start; fused AbsTopK forward and backward, massive ties.
2. Timings side by side in this process, on the same inputs: SpMM against dense cuBLAS and torch.sparse CSR,
   selection against the reference projection (and bare torch.topk), AbsTopK against torch.topk + scatter.
3. The training step at the paper preset's final density, kernels=default against kernels=fast, both compiled,
   with a short loss comparison: `python -m sparse_lm.bench mode=train` in a subprocess (this package imports
   nothing from sparse_lm).
4. One MET / NOT MET line per target; everything in DIR/check.json.

On a CUDA machine it runs at the reference shapes (budget: under 8 minutes on one H100/H200, JIT compiles
included). Without one it runs its reduced mode: Triton's interpreter (TRITON_INTERPRET=1, set here before any
kernel is imported), tiny shapes, the same checks and the same lines. Interpreter timings say nothing about a
GPU, so its speed targets read NOT MET; the reduced mode exists so that the GPU run is never the code's first run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

from kernels.abstopk import abstopk  # noqa: E402
from kernels.compress import compress  # noqa: E402
from kernels.crossover import random_sparse_weight  # noqa: E402
from kernels.reference import projection_mask, topk_mask  # noqa: E402
from kernels.runtime import time_ms  # noqa: E402
from kernels.select import select_topk  # noqa: E402
from kernels.spmm import sparse_linear, spmm  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
# (full: the reference shapes; reduced: the interpreter's). SpMM shapes are W [out, in]; densities low, high.
FULL = {"tokens": 65_536, "shapes": [(8192, 2048), (4096, 1024)], "densities": [0.001, 0.003, 0.01], "odd": (1000, 777, 4099),
        "select": (4096, 4096), "abstopk": [(16_384, 1024), (4096, 8192)], "half": torch.bfloat16}
REDUCED = {"tokens": 128, "shapes": [(96, 64), (64, 32)], "densities": [0.05, 0.1, 0.2], "odd": (33, 45, 70),
           "select": (64, 64), "abstopk": [(64, 64), (16, 256)], "half": torch.float16}  # bf16 is unreliable there
J = 4  # the j rule: every row keeps its 4 largest


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------- correctness


def check_spmm(p: dict) -> list[dict]:
    rows = []
    out, inp, T = p["odd"]
    cases = [(s[0], s[1], p["tokens"]) for s in p["shapes"]] + [(out, inp, T)]
    for (n, k, tokens) in cases:
        for dtype in (p["half"], torch.float32):
            tol = 1e-2 if dtype != torch.float32 else 1e-5
            w = random_sparse_weight((n, k), p["densities"][-1], DEVICE, seed=n + k)
            nnz = int((w != 0).sum())
            fwd, bwd = compress(w, nnz, dtype), compress(w.t(), nnz, dtype)
            wq = fwd.to_dense().float()  # the weights as the kernel stores them (rounded to dtype)
            x = torch.randn(tokens, k, device=DEVICE, dtype=dtype, requires_grad=True)
            y = sparse_linear(x, w.clone().requires_grad_(True), None, fwd, bwd, "triton")
            dy = torch.randn_like(y)
            y.backward(dy)
            name = f"SpMM {n}x{k}, {tokens} tokens, {str(dtype)[6:]}"
            rows.append({"check": f"{name}: forward", "error": rel_err(y, x.detach().float() @ wq.t()), "tol": tol})
            rows.append({"check": f"{name}: dX with a random dY", "error": rel_err(x.grad, dy.float() @ wq), "tol": tol})
            fm = x.detach().t().contiguous().t()  # feature-major: contiguous along tokens
            rows.append({"check": f"{name}: feature-major X", "error": rel_err(spmm(fm, fwd.row_ptr, fwd.cols, fwd.vals, fwd.order, n), y.detach()), "tol": tol})
            y_fm = spmm(fm, fwd.row_ptr, fwd.cols, fwd.vals, fwd.order, n, True)
            rows.append({"check": f"{name}: feature-major X and Y (Y stored along tokens)", "tol": tol,
                         "error": rel_err(y_fm, y.detach()) if y_fm.stride() == (1, tokens) else float("inf")})
    w = random_sparse_weight(p["shapes"][1], p["densities"][-1], DEVICE, seed=7)
    nnz = int((w != 0).sum())
    short = compress(w, nnz // 2)
    x = torch.randn(p["tokens"], w.shape[1], device=DEVICE)
    rows.append({"check": "SpMM with an undersized capacity reads only what was written", "tol": 1e-5,
                 "error": rel_err(spmm(x, short.row_ptr, short.cols, short.vals, short.order, w.shape[0]), x @ short.to_dense().t())})
    return rows


def check_select(p: dict) -> list[dict]:
    rows = []
    n, k_in = p["select"]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for label, w in (("random", torch.randn(n, k_in, device=DEVICE, generator=gen)),
                     ("massive ties", torch.randint(-8, 9, (n, k_in), device=DEVICE, generator=gen).float())):
        k = w.numel() // 64
        for axis, neurons in ((0, "rows"), (1, "columns")):  # the j rule read along a row, and down a column
            mask, thr = select_topk(w, k, J, axis)
            rows.append({"check": f"selection {n}x{k_in}, k = 1/64, j = {J} per {neurons}, {label}: identical survivors",
                         "error": int((mask != projection_mask(w, k, J, axis)).sum()), "tol": 0})
        moved = w + 1e-3 * torch.randn(w.shape, device=DEVICE, generator=gen) * (label == "random")
        for axis in (0, 1):
            warm, _ = select_topk(moved, k, J, axis, thr)
            rows.append({"check": f"selection {label}, j per {('row', 'column')[axis]}, warm-started from the last threshold: "
                                  "identical survivors", "error": int((warm != projection_mask(moved, k, J, axis)).sum()), "tol": 0})
    if CUDA:  # every launch is unconditional with its state on the device: one graph replays the whole selection
        graph, w, mask = select_graph(n, k_in, J)
        w.copy_(torch.randn(w.shape, device=DEVICE, generator=gen))
        graph.replay()
        rows.append({"check": "selection replayed from a CUDA graph on new weights: identical survivors",
                     "error": int((mask != projection_mask(w, w.numel() // 64, J, 0)).sum()), "tol": 0})
    return rows


def select_graph(n: int, k_in: int, j: int):
    """(a CUDA graph of one warm-started selection with the j rule per row, its weight buffer, its mask)."""
    w = torch.randn(n, k_in, device=DEVICE)
    k = w.numel() // 64
    _, thr = select_topk(w, k, j, 0)
    select_topk(w, k, j, 0, thr)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mask, _ = select_topk(w, k, j, 0, thr)
    return graph, w, mask


def check_abstopk(p: dict) -> list[dict]:
    rows = []
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    for (tokens, d) in p["abstopk"]:
        for dtype in (p["half"], torch.float32):
            for label, x in (("random", torch.randn(tokens, d, device=DEVICE, generator=gen)),
                             ("massive ties", torch.randint(-4, 5, (tokens, d), device=DEVICE, generator=gen).float())):
                x = x.to(dtype).requires_grad_(True)
                k = d // 4
                y = abstopk(x, k)
                dy = torch.randn(y.shape, device=DEVICE, generator=gen).to(dtype)
                y.backward(dy)
                keep = topk_mask(x.detach().abs().float(), k, dim=-1)
                wrong = int((y.detach() != x.detach() * keep).sum()) + int((x.grad != dy * keep).sum())
                rows.append({"check": f"AbsTopK {tokens}x{d}, k = d/4, {str(dtype)[6:]}, {label}: forward and backward identical",
                             "error": wrong, "tol": 0})
                fm = x.detach().t().contiguous().t()  # stored along tokens, as the feature-major MLP interior has it
                y_fm = abstopk(fm, k)
                wrong = int((y_fm != x.detach() * keep).sum()) + (0 if y_fm.stride() == fm.stride() else 1)
                rows.append({"check": f"AbsTopK {tokens}x{d}, {str(dtype)[6:]}, {label}, stored along tokens: identical, same layout",
                             "error": wrong, "tol": 0})
    return rows


# ------------------------------------------------------------------------------------------------- timings


def timed(fn, rep_ms: float) -> float:
    return time_ms(fn, CUDA, warmup_ms=rep_ms / 4, rep_ms=rep_ms)


def time_spmm(p: dict, rep_ms: float) -> list[dict]:
    rows = []
    for (n, k) in p["shapes"]:
        for density in p["densities"]:
            w = random_sparse_weight((n, k), density, DEVICE, seed=3)
            nnz = int((w != 0).sum())
            dtype = p["half"] if CUDA else torch.float32  # torch's CPU CSR matmul takes no 16-bit types
            fwd, bwd = compress(w, nnz, dtype), compress(w.t(), nnz, dtype)
            wd = w.to(dtype)
            x = torch.randn(p["tokens"], k, device=DEVICE, dtype=dtype)
            dy = torch.randn(p["tokens"], n, device=DEVICE, dtype=dtype)
            csr_f, csr_b = fwd.to_torch_sparse(), bwd.to_torch_sparse()
            for op, dense, csr, ours in (
                ("forward", lambda: x @ wd.t(), lambda: (csr_f @ x.t()).t(), lambda: spmm(x, fwd.row_ptr, fwd.cols, fwd.vals, fwd.order, n)),
                ("dX", lambda: dy @ wd, lambda: (csr_b @ dy.t()).t(), lambda: spmm(dy, bwd.row_ptr, bwd.cols, bwd.vals, bwd.order, k)),
            ):
                t = {name: timed(fn, rep_ms) for name, fn in (("dense", dense), ("csr", csr), ("triton", ours))}
                rows.append({"op": op, "shape": [n, k], "density": density, "ms": t,
                             "vs_dense": t["dense"] / t["triton"], "vs_csr": t["csr"] / t["triton"]})
                log(f"  SpMM {op} {n}x{k} at {density:.1%}: {t['triton']:.3f} ms, {rows[-1]['vs_dense']:.3g}x dense, "
                    f"{rows[-1]['vs_csr']:.3g}x CSR")
    return rows


def time_select(p: dict, rep_ms: float) -> dict:
    n, k_in = p["select"]
    w = torch.randn(n, k_in, device=DEVICE)
    k = w.numel() // 64
    t = {"reference projection, j per row": timed(lambda: projection_mask(w, k, J, 0), rep_ms),
         "reference projection, j per column": timed(lambda: projection_mask(w, k, J, 1), rep_ms),
         "torch.topk alone": timed(lambda: w.abs().flatten().topk(k, sorted=False), rep_ms),
         "kernels, j per row": timed(lambda: select_topk(w, k, J, 0), rep_ms),
         "kernels, j per column": timed(lambda: select_topk(w, k, J, 1), rep_ms)}
    if CUDA:  # the same selection without launch overhead (the warm path, as the trainer's steps after the first)
        graph, *buffers = select_graph(n, k_in, J)  # the graph reads and writes those buffers: keep them alive
        t["kernels, j per row, warm, one CUDA graph"] = timed(graph.replay, rep_ms)
    ratios = {axis: t[f"reference projection, j per {axis}"] / t[f"kernels, j per {axis}"] for axis in ("row", "column")}
    row = {"shape": [n, k_in], "ms": t, "vs_reference_by_axis": ratios, "vs_reference": min(ratios.values()),
           "vs_topk": t["torch.topk alone"] / max(t["kernels, j per row"], t["kernels, j per column"])}
    log(f"  selection {n}x{k_in}: {ratios['row']:.3g}x (j per row) and {ratios['column']:.3g}x (j per column) the reference "
        f"projection; the slower {row['vs_topk']:.3g}x bare torch.topk")
    if CUDA:
        log(f"  selection from one CUDA graph (warm, j per row): {t['reference projection, j per row'] / t['kernels, j per row, warm, one CUDA graph']:.3g}x the reference")
    return row


def topk_scatter(x: torch.Tensor, k: int) -> torch.Tensor:
    """The unfused baseline: torch.topk of |x|, then gather and scatter (autograd through both)."""
    idx = x.detach().abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


def time_abstopk(p: dict, rep_ms: float) -> list[dict]:
    rows = []
    for (tokens, d) in p["abstopk"]:
        dtype = p["half"] if CUDA else torch.float32
        x = torch.randn(tokens, d, device=DEVICE, dtype=dtype, requires_grad=True)
        dy = torch.randn(tokens, d, device=DEVICE, dtype=dtype)
        k = d // 4

        def both(fn):
            return lambda: torch.autograd.grad(fn(x, k), x, dy)

        t = {"torch.topk + scatter": timed(both(topk_scatter), rep_ms), "fused": timed(both(abstopk), rep_ms)}
        rows.append({"shape": [tokens, d], "ms": t, "speedup": t["torch.topk + scatter"] / t["fused"]})
        log(f"  AbsTopK {tokens}x{d} forward + backward: {rows[-1]['speedup']:.3g}x torch.topk + scatter")
    return rows


# ------------------------------------------------------------------------------------------------- the step


def run_step(out: Path, steps: int, compare: int) -> dict | None:
    """kernels=default against kernels=fast, token- and feature-major (and fp32 as the noise yardstick on a GPU)."""
    if importlib.util.find_spec("sparse_lm") is None:
        return None
    if CUDA:
        settings = {"default": "kernels=default", "fast": "kernels=fast", "fast_fm": "kernels=fast kernels.mlp_feature_major=true",
                    "fp32": "kernels=default train.precision=fp32"}
        args = ["train_overrides=['preset=paper','train.compile=true']", f"train_steps={steps}", f"compare_steps={compare}",
                "train_kernels=[" + ",".join(f"'{v}'" for v in settings.values()) + "]"]
    else:  # one narrow layer, the Triton kernels forced on (auto stays dense on a CPU), uncompiled under the interpreter;
        # a CPU computes in fp32 already, so there is no fp32 yardstick to run
        settings = {"default": "kernels=default", "fast": "kernels=fast kernels.backend=triton",
                    "fast_fm": "kernels=fast kernels.backend=triton kernels.mlp_feature_major=true"}
        small = ["preset=tiny", "model.n_layer=1", "model.d_model=32", "model.d_mlp=128", "model.ctx_len=32", "data.vocab_size=512",
                 "sparsity.hidden_density=0.25", "train.batch_size=2", "train.compile=false"]
        args = ["cpu_train_overrides=[" + ",".join(f"'{o}'" for o in small) + "]", f"train_steps={steps}", f"cpu_compare_steps={compare}",
                "cpu_train_kernels=[" + ",".join(f"'{v}'" for v in settings.values()) + "]"]
    cmd = [sys.executable, "-m", "sparse_lm.bench", "mode=train", *args, f"hydra.run.dir={out / 'step'}"]
    log("  " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stdout[-2000:] + proc.stderr[-3000:])}
    measured = json.loads((out / "step" / "results.json").read_text())["settings"]
    got = {name: measured[setting] for name, setting in settings.items()}
    return {"tokens_per_sec": {k: v["tokens_per_sec"] for k, v in measured.items()}, "speedup": got["fast"]["speedup"],
            "max_loss_diff": got["fast"].get("max_loss_diff"), "bf16_noise": got["fp32"].get("max_loss_diff") if "fp32" in got else None,
            "speedup_feature_major": got["fast_fm"]["speedup"], "max_loss_diff_feature_major": got["fast_fm"].get("max_loss_diff")}


# ------------------------------------------------------------------------------------------------- verdict


def targets(p: dict, checks: list[dict], spmm_rows: list[dict], sel: dict, abst: list[dict], step: dict | None) -> list[tuple[str, bool, str]]:
    def spmm_ratio(shape, density):
        return min(r["vs_dense"] for r in spmm_rows if tuple(r["shape"]) == tuple(shape) and r["density"] == density)

    big, small = p["shapes"]
    lo, hi = p["densities"][0], p["densities"][-1]
    failed = [c["check"] for c in checks if not c["ok"]]
    out = [("every correctness check passes", not failed, f"{len(checks) - len(failed)}/{len(checks)}" + (f"; failed: {failed[:3]}" if failed else ""))]
    for shape, density, need in ((big, lo, 5.0), (small, lo, 3.0), (big, hi, 2.5)):
        r = spmm_ratio(shape, density)
        out.append((f"SpMM forward and dX at {density:.1%}, {shape[0]}x{shape[1]}: >= {need}x dense", r >= need, f"{r:.3g}x (the slower of the two)"))
    csr = min(r["vs_csr"] for r in spmm_rows)
    out.append((f"SpMM faster than torch.sparse CSR at every density <= {hi:.1%}", csr > 1.0, f"slowest {csr:.3g}x"))
    same = all(c["ok"] for c in checks if c["check"].startswith("selection"))
    out.append((f"selection on {sel['shape'][0] * sel['shape'][1]:,} entries with the j rule: >= 10x the reference, identical survivors",
                sel["vs_reference"] >= 10 and same, f"{sel['vs_reference']:.3g}x (the slower of rows, columns); identical: {same}"))
    same = all(c["ok"] for c in checks if c["check"].startswith("AbsTopK"))
    for row, need in zip(abst, (4.0, 2.0)):
        out.append((f"fused AbsTopK forward + backward at d = {row['shape'][1]}: >= {need}x torch.topk + scatter, identical",
                    row["speedup"] >= need and same, f"{row['speedup']:.3g}x; identical: {same}"))
    if step is None or "error" in step:
        why = "not run: sparse_lm is not installed" if step is None else "the bench failed (see check.json)"
        out.append(("training step: kernels=fast >= 1.5x kernels=default, losses within bf16 noise", False, why))
        out.append(("training step: the MLP interior feature-major is faster than token-major (kernels=fast), same losses", False, why))
    else:
        noise = max(step["bf16_noise"] or 0.0, 1e-3)
        ok = step["speedup"] >= 1.5 and step["max_loss_diff"] is not None and step["max_loss_diff"] <= noise
        out.append(("training step: kernels=fast >= 1.5x kernels=default, losses within bf16 noise", ok,
                    f"{step['speedup']:.3g}x; max |loss diff| {step['max_loss_diff']:.4f} against bf16-vs-fp32 {noise:.4f}"))
        fm, fm_diff = step["speedup_feature_major"], step["max_loss_diff_feature_major"]
        out.append(("training step: the MLP interior feature-major is faster than token-major (kernels=fast), same losses",
                    CUDA and fm > step["speedup"] and fm_diff is not None and fm_diff <= noise,  # the interpreter's times say nothing
                    f"{fm:.3g}x kernels=default against {step['speedup']:.3g}x; max |loss diff| {fm_diff:.4f}"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="kernels-check", help="directory for check.json and the step's bench output")
    ap.add_argument("--no-step", action="store_true", help="skip the training-step comparison")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    p = FULL if CUDA else REDUCED
    device = torch.cuda.get_device_name() if CUDA else "CPU, Triton interpreter (reduced mode: timings mean nothing)"
    log(f"kernels.check on {device}, torch {torch.__version__}")
    t0 = time.time()
    log("1/4 correctness")
    checks = check_spmm(p) + check_select(p) + check_abstopk(p)
    for c in checks:
        c["ok"] = c["error"] <= c["tol"]
        if not c["ok"]:
            log(f"  FAILED {c['check']}: error {c['error']} > {c['tol']}")
    log(f"  {sum(c['ok'] for c in checks)}/{len(checks)} checks pass")
    log("2/4 timings, side by side")
    rep = 100 if CUDA else 5
    spmm_rows, sel, abst = time_spmm(p, rep), time_select(p, rep), time_abstopk(p, rep)
    log("3/4 the training step")
    step = None if args.no_step else run_step(out, 10 if CUDA else 1, 30 if CUDA else 2)
    if step and "error" in step:
        log("  the bench failed:\n" + step["error"])
    verdict = targets(p, checks, spmm_rows, sel, abst, step if not args.no_step else None)
    log(f"4/4 verdict ({time.time() - t0:.0f} s)")
    for name, ok, detail in verdict:
        print(f"{'MET    ' if ok else 'NOT MET'}  {name}: {detail}")
    report = {"device": device, "torch": torch.__version__, "reduced": not CUDA, "seconds": round(time.time() - t0, 1),
              "checks": checks, "spmm": spmm_rows, "selection": sel, "abstopk": abst, "step": step,
              "targets": [{"target": n, "met": ok, "detail": d} for n, ok, d in verdict]}
    (out / "check.json").write_text(json.dumps(report, indent=1, default=str))
    log(f"wrote {out / 'check.json'}")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
