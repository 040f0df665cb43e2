"""What the kernels become on an H100/H200, without one: compile for sm_90, read the SASS, predict the time.

    python -m sparse_lm.bench.static --sm90 ../shared/tools/sm90.py [--json static.json]

Each kernel is compiled (not run) at the reference shapes with the launch parameters it really uses (and variants
worth comparing), by the sm_90 compile tool the project keeps beside the repository. From the SASS: registers,
spills, shared memory, occupancy, and the hot loop's instruction mix. From the shapes: the work per call, the DRAM
bytes it must move, the L1/shared-memory sectors its accesses touch, and the warp instructions it issues. The
prediction is the largest of three times (each resource alone, at its peak):

    DRAM    bytes / HBM bandwidth
    L1      32-byte sectors × 32 / (SMs × 128 B/clk × clock)
    issue   warp instructions / (SMs × 4 schedulers × clock)

It is a bound, not a forecast: latency that too few warps cannot hide comes on top (see the occupancy column), so
measured times can only be slower. docs/benchmarks.md explains each kernel's row.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import triton

GPUS = {  # sustained figures: SPEC-measured HBM and GEMM rates for the H100; the H200 differs in HBM only
    "H100": {"sms": 132, "clock": 1.755e9, "hbm": 3.0e12, "gemm_flops": 8.0e14},
    "H200": {"sms": 132, "clock": 1.755e9, "hbm": 4.3e12, "gemm_flops": 8.0e14},
}
TOKENS = 65_536


def load_sm90(path: str):
    spec = importlib.util.spec_from_file_location("sm90", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # installs the compile-only CUDA driver: before any kernel is compiled
    return mod


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, text) of every SASS instruction (addresses past 0xffff included, which a 4-digit pattern misses)."""
    return [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]


def loops(sass: str) -> list[list[str]]:
    """The body of every backward branch (a loop), in the order the branches appear; nested loops each count."""
    ins = instructions(sass)
    out = []
    for addr, text in ins:
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            out.append([t for a, t in ins if int(m.group(1), 16) <= a <= addr])
    return out


def hot_loop(sass: str) -> tuple[int, Counter]:
    """(instructions, opcode counts) of the longest backward branch's body: the kernel's inner loop (0 if none)."""
    best: list[str] = max(loops(sass), key=len, default=[])
    ops = Counter()
    for t in best:
        op = re.sub(r"^@!?U?P[T\d]+\s+", "", t).split()[0]
        ops[op if op.startswith(("LDG", "STG", "LDS", "STS")) else op.split(".")[0]] += 1
    return len(best), ops


@dataclass
class Case:
    name: str
    kernel: object
    args: tuple
    meta: dict
    grid: tuple
    work: float  # multiply-adds (SpMM) or entries (the rest)
    unit: str
    dram: float  # bytes the call must move at least
    sectors: float  # 32-byte L1 sectors its loads and stores touch
    iterations: float  # hot-loop trips per program (0: straight-line code)
    # For nested loops: instructions one program issues, from the loop bodies' sizes (in the order of loops()).
    per_program: Callable[[list[int]], float] | None = None


def spmm_cases() -> list[Case]:
    from kernels.spmm import _spmm_kernel

    cases = []
    for (n, k) in ((8192, 2048), (4096, 1024)):
        for density in (0.01, 0.001):
            nnz = int(n * k * density)
            for layout in ("token-major", "feature-major"):
                T = TOKENS
                x = torch.empty(T, k, dtype=torch.bfloat16) if layout == "token-major" else torch.empty(k, T, dtype=torch.bfloat16).t()
                y = torch.empty(T, n, dtype=torch.bfloat16) if layout == "token-major" else torch.empty(n, T, dtype=torch.bfloat16).t()
                args = (x, y, torch.empty(n + 1, dtype=torch.int32), torch.empty(nnz, dtype=torch.int16),
                        torch.empty(nnz, dtype=torch.bfloat16), torch.empty(n, dtype=torch.int32), T, n,
                        x.stride(0), x.stride(1), y.stride(0), y.stride(1))
                macs = T * nnz
                per_sector = 1 if layout == "token-major" else 16  # bf16 elements one 32-byte sector serves
                cases.append(Case(f"spmm {n}x{k} {density:.1%} {layout}", _spmm_kernel, args,
                                  dict(BT=64, BR=32, UNROLL=2, num_warps=4), (triton.cdiv(n, 32) * triton.cdiv(T, 64),),
                                  macs, "MAC", T * (k + n) * 2 + nnz * 4, macs / per_sector + T * n / per_sector,
                                  math.ceil(nnz / n / 2)))
    return cases


def abstopk_cases() -> list[Case]:
    from kernels.abstopk import _abstopk_kernel

    cases = []
    # (d, tokens per program, warps, stored along tokens): (1024, 1, 1) is the launch since issue 14; the feature-major
    # rows are the MLP interior's launch with kernels.mlp_feature_major (d_mlp 4096 at the reference shapes).
    for d, rows, warps, fm in ((1024, 2, 4, False), (1024, 1, 1, False), (8192, 1, 8, False), (8192, 1, 16, False),
                               (1024, 16, 4, True), (4096, 4, 8, True), (8192, 2, 8, True)):
        for dtype, bits in ((torch.bfloat16, 15), (torch.float32, 31)):
            x = torch.empty(d, TOKENS, dtype=dtype).t() if fm else torch.empty(TOKENS, d, dtype=dtype)
            el = x.element_size()
            args = (x, torch.empty_like(x), torch.empty_like(x, dtype=torch.bool), TOKENS, d, d // 4, x.stride(0), x.stride(1))
            layout = ", feature-major" if fm else ""
            # Feature-major: each feature of a program's tokens is one run of rows·el bytes (x, y) and rows (mask).
            sectors = (TOKENS // rows) * d * (2 * math.ceil(rows * el / 32) + math.ceil(rows / 32)) if fm else TOKENS * d * (2 * el + 1) / 32
            cases.append(Case(f"abstopk d={d} {str(dtype)[6:]} rows/program={rows} warps={warps}{layout}", _abstopk_kernel, args,
                              dict(ROWS=rows, BLOCK_D=d, MAG_BITS=bits, num_warps=warps), (TOKENS // rows,),
                              TOKENS * d, "entry", TOKENS * d * (2 * el + 1), sectors, 0))
    return cases


def compress_cases() -> list[Case]:
    from kernels.compress import _compact_kernel

    n, k = 8192, 2048
    nnz = n * k // 100
    cases = []
    for name, a in (("rows of W", torch.empty(n, k)), ("rows of Wᵀ", torch.empty(n, k).t())):
        rows, cols = a.shape
        args = (a, torch.empty(rows + 1, dtype=torch.int32), torch.empty(nnz, dtype=torch.int16), torch.empty(nnz, dtype=torch.bfloat16),
                nnz, rows, cols, a.stride(0), a.stride(1))
        coalesced = a.stride(1) == 1
        cases.append(Case(f"compaction 8192x2048 1% ({name})", _compact_kernel, args, dict(BLOCK_R=16, BLOCK_C=256),
                          (triton.cdiv(rows, 16),), n * k, "entry", n * k * 4 + nnz * 4,
                          n * k * 4 / 32 * (1 if coalesced else 8), cols / 256))
    return cases


def select_cases() -> list[Case]:
    from kernels.select import _hi_mask, _protect_pass, _radix_pass, _select_strict, launch_sizes

    sizes = launch_sizes(cuda=True)
    BLOCK, MAX_PROGRAMS = sizes["block"], sizes["programs"]

    side = 4096
    n = side * side
    w, prot = torch.empty(n), torch.empty(n, dtype=torch.int8)
    state, hist = torch.empty(4, dtype=torch.int32), torch.empty(512, dtype=torch.int32)
    programs = min(triton.cdiv(n, BLOCK), MAX_PROGRAMS)
    cases = []
    j = 4  # the default j rule: j + 1 sweeps of each neuron's fan, then the pass that writes the mask
    block_n, block_f, warps = sizes["protect"]
    tiles = triton.cdiv(side, block_n)
    grid, chunks = min(tiles, MAX_PROGRAMS), side / block_f

    def count(loop_sizes):  # loops in order: the sweep's chunk loop, the j loop, the last pass, the tile loop
        if len(loop_sizes) != 4:
            raise RuntimeError(f"_protect_pass compiled to {len(loop_sizes)} loops, not the 4 this count assumes (sweep, j, "
                               "last pass, tiles): update select_cases for this Triton version")
        sweep, j_loop, last, tile = loop_sizes
        return tiles / grid * ((j + 1) * (sweep * chunks + (j_loop - sweep)) + last * chunks + (tile - j_loop - last))

    # DRAM: w read once (the later sweeps hit L1), the mask written; L1 sectors: j + 2 sweeps and the mask. Columns as
    # neurons add two torch transposes in front (w) and behind (the mask): 170 MB more, not counted here.
    cases.append(Case("select: protection (j per row) fused with the first radix pass", _protect_pass,
                      (w, torch.empty(n, dtype=torch.bool), side, side, j, state, hist),
                      dict(SHIFT=24, HI_MASK=_hi_mask(24), WARM=False, BLOCK_N=block_n, BLOCK_F=block_f, num_warps=warps),
                      (grid,), n, "entry", n * 5, n * (4 * (j + 2) + 1) / 32, 0, count))
    cases += [
        Case("select: one radix pass over 16.8 M (with protection)", _radix_pass, (w, prot, n, state, hist),
             dict(SHIFT=16, HI_MASK=_hi_mask(16), LEVEL=8, WARM=False, HAS_PROT=True, BLOCK=BLOCK), (programs,),
             n, "entry", n * 5, n * 5 / 32, triton.cdiv(n, BLOCK) / programs),
        Case("select: threshold pass writing the bool mask", _select_strict,
             (w, prot, n, state, torch.empty(n, dtype=torch.bool), torch.empty(n // BLOCK, dtype=torch.int32)),
             dict(HAS_PROT=True, BLOCK=BLOCK), (triton.cdiv(n, BLOCK),), n, "entry", n * 6, n * 6 / 32, 0),
    ]
    return cases


def analyse(sm90, case: Case) -> dict:
    row = sm90.report(case.kernel, *case.args, grid=case.grid, **case.meta)
    sass = open(row["files"].replace("{cubin,ptx,ttgir,sass}", "sass")).read()
    body, ops = hot_loop(sass)
    programs, warps = math.prod(case.grid), row["num_warps"]
    total = len(instructions(sass))  # the tool's own count stops at 4,096 (four-digit addresses)
    if case.per_program is not None:
        per_program = case.per_program([len(b) for b in loops(sass)])
    else:
        per_program = (total - body) + body * case.iterations if case.iterations else total
    warp_instr = programs * warps * per_program
    out = {"case": case.name, "registers": row["registers"], "spill_bytes": row["spill_bytes"], "shared_bytes": row["shared_bytes"],
           "occupancy": row["occupancy"], "barriers": row["barriers"], "shuffles": row["shuffles"],
           "loop_instructions": body, "loop_ops": dict(ops.most_common(8)), "work": case.work, "unit": case.unit,
           "instructions_per_1k_units": 1000 * warp_instr / case.work}
    for gpu, g in GPUS.items():
        times = {"dram": case.dram / g["hbm"], "l1": case.sectors * 32 / (g["sms"] * 128 * g["clock"]),
                 "issue": warp_instr / (g["sms"] * 4 * g["clock"])}
        out[f"{gpu}_ms"] = {k: round(v * 1e3, 4) for k, v in times.items()}
        out[f"{gpu}_bound"] = max(times, key=times.get)
        out[f"{gpu}_predicted_ms"] = round(max(times.values()) * 1e3, 4)
    return out


def dense_gemm_ms(n: int, k: int, gpu: str) -> float:
    return 2 * TOKENS * n * k / GPUS[gpu]["gemm_flops"] * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sm90", default="../shared/tools/sm90.py", help="the sm_90 compile tool")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    sm90 = load_sm90(args.sm90)
    rows = [analyse(sm90, c) for c in spmm_cases() + abstopk_cases() + compress_cases() + select_cases()]
    print(f"{'case':58s} {'regs':>4s} {'occ':>5s} {'bar':>4s} {'loop':>5s} {'instr/1k':>9s} {'H100 ms':>8s} {'bound':>6s} {'H200 ms':>8s}")
    for r in rows:
        print(f"{r['case']:58s} {r['registers']:4d} {r['occupancy']:5.2f} {r['barriers']:4d} {r['loop_instructions']:5d} "
              f"{r['instructions_per_1k_units']:9.1f} {r['H100_predicted_ms']:8.3f} {r['H100_bound']:>6s} {r['H200_predicted_ms']:8.3f}")
    for n, k in ((8192, 2048), (4096, 1024)):
        print(f"dense bf16 GEMM {n}x{k} at {TOKENS} tokens (800 TFLOP/s): {dense_gemm_ms(n, k, 'H100'):.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
