"""`python -m sparse_lm.bench mode=profile [baseline=<rev>]`: where a CPU training step of the default config spends
its time, per ATen op (self CPU time per step, torch.profiler), for this checkout and optionally a git revision.

Both run in one process from the same state (`profile_step`, on the default schedule), with this checkout's malloc
settings. The profiler adds a fixed cost per op and attributes memory stalls to whichever op touches memory first,
so read the table for where time goes, and `mode=versus` for speed-ups.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

import sparse_lm
from sparse_lm.bench.versus import REPO, Side, import_revision
from sparse_lm.config import BenchConfig
from sparse_lm.hostmem import keep_freed_memory


def op_times(side: Side, start: int, steps: int) -> tuple[dict[str, float], float]:
    """(op -> self CPU ms per step, wall ms per step) over `steps` steps from step `start` (after 2 warm-up steps)."""
    side.run.step = start
    side.steps(2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        side.steps(steps)
    return {e.key: e.self_cpu_time_total / steps / 1e3 for e in prof.key_averages()}, sum(side.seconds[-steps:]) / steps * 1e3


def run_profile(bench: BenchConfig, out_dir: Path, rows: int = 30) -> dict:
    keep_freed_memory()
    sides = {"this checkout": Side("this", sparse_lm, REPO / "conf", bench.versus_overrides, None)}
    if bench.mode == "profile" and bench.baseline != "HEAD":
        pkg, conf = import_revision(bench.baseline)
        sides = {f"baseline {bench.baseline}": Side("baseline", pkg, conf, bench.versus_overrides, None), **sides}
    result = {}
    for label, side in sides.items():
        ops, wall = op_times(side, bench.profile_step, bench.profile_steps)
        result[label] = {"ms_per_step_under_profiler": wall, "ops": ops}
    labels = list(result)
    order = sorted({k for r in result.values() for k in r["ops"]}, key=lambda k: -max(r["ops"].get(k, 0) for r in result.values()))
    lines = [f"self CPU ms per step at step {bench.profile_step} ({bench.profile_steps} steps, torch.profiler)",
             f"{'op':<58}" + "".join(f"{lab[:22]:>24}" for lab in labels)]
    for key in order[:rows]:
        lines.append(f"{key[:58]:<58}" + "".join(f"{result[lab]['ops'].get(key, 0):>24.1f}" for lab in labels))
    lines.append(f"{'all ops':<58}" + "".join(f"{sum(result[lab]['ops'].values()):>24.1f}" for lab in labels))
    lines.append(f"{'wall ms per step under the profiler':<58}" + "".join(f"{result[lab]['ms_per_step_under_profiler']:>24.1f}" for lab in labels))
    table = "\n".join(lines)
    (out_dir / "table.txt").write_text(table + "\n")
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    print(table)
    return result
