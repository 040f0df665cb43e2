"""What a sweep found: one row per run, one per grid point (over seeds), and the sparse/dense ratio at matched loss.

A run's score is the geometric mean of circuit edges over the tasks whose circuits pass the battery the prune ran
(`passes_what_ran` in its summary.json: with controls=all and check=true that is "trusted"). Comparing two models
means comparing them on the same tasks, so the ratio at matched loss uses, for each sparse point, the tasks every one
of its seeds passes, and a dense curve made of the dense points whose every seed passes those tasks too.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sparse_lm import checkpoint
from sparse_lm.circuits.battery import geometric_mean
from sparse_lm.circuits.prune import default_output_dir
from sparse_lm.frontier.grid import Point
from sparse_lm.metrics import read_metrics
from sparse_lm.roles import role

# Two-sided 95% quantiles of Student's t for 1..10 degrees of freedom (beyond: the normal 1.96 is within 12%).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass
class RunRow:
    run: str
    kind: str
    size: str
    density: float | None
    seed: int
    steps: int
    trained_steps: int | None = None  # the latest checkpoint's step (None: not started)
    val_loss: float | None = None  # at the final step
    nonzero_params: int | None = None  # nonzero weights, embeddings and biases (not gains, sinks or the bigram table)
    tasks_solved: list[str] = field(default_factory=list)  # by the whole model
    circuits: dict[str, int] = field(default_factory=dict)  # task -> edges of every circuit found, passing or not
    passing: dict[str, int] = field(default_factory=dict)  # task -> edges of the circuits that pass the battery run
    gm_edges: float | None = None  # geometric mean over `passing`
    gm_edges_all: float | None = None  # over `circuits`
    battery: str = ""  # the checks and controls that ran


def nonzero_params(ckpt: Path) -> int:
    weights = checkpoint.load_weights(ckpt)
    return int(sum((w != 0).sum() for name, w in weights.items() if role(name).kind in ("hidden", "embed", "bias")))


def battery_run(summary: dict, config: dict) -> str:
    controls = config.get("controls", [])
    asked = "all" if controls == "all" else ", ".join(controls) or "none"
    return f"controls={asked}, checks={'on' if config.get('check', True) else 'off'}, seeds={summary.get('seeds')}"


def run_row(point: Point, sweep: Path) -> RunRow:
    row = RunRow(point.name, point.kind, point.size, point.density, point.seed, point.steps)
    ckpt = checkpoint.latest(point.run_dir(sweep) / "checkpoints")
    if ckpt is None:
        return row
    row.trained_steps = checkpoint.step_of(ckpt)
    if row.trained_steps < point.steps:
        return row
    finals = [r["val_loss"] for r in read_metrics(point.run_dir(sweep) / "metrics.jsonl") if r.get("step") == point.steps and "val_loss" in r]
    row.val_loss = finals[-1] if finals else None
    row.nonzero_params = nonzero_params(ckpt)
    out = default_output_dir(ckpt)
    if not (out / "summary.json").exists():
        return row
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "run.json").read_text()).get("config", {})
    row.battery = battery_run(summary, config)
    passing = set(summary.get("passes_what_ran", summary["trusted"]))
    for t in summary["tasks"]:
        if t["task"] not in summary["not_solved_by_whole_model"]:
            row.tasks_solved.append(t["task"])
        if t["edges"] is not None and t["circuit_loss"] is not None:
            row.circuits[t["task"]] = t["edges"]
            if t["task"] in passing:
                row.passing[t["task"]] = t["edges"]
    row.gm_edges = geometric_mean(list(row.passing.values()))
    row.gm_edges_all = geometric_mean(list(row.circuits.values()))
    return row


@dataclass
class PointRow:
    """One grid point over its seeds."""

    point: str  # the run name without its seed
    kind: str
    size: str
    density: float | None
    steps: int
    seeds: int
    val_loss: float | None  # mean over the seeds that finished
    val_loss_sd: float | None
    nonzero_params: float | None
    gm_edges: float | None  # geometric mean over seeds of the runs' scores (seeds without a passing circuit left out)
    gm_edges_min: float | None
    gm_edges_max: float | None
    seeds_scored: int  # seeds with at least one passing circuit
    tasks: list[str]  # tasks passing in every seed


def point_key(row: RunRow) -> str:
    return row.run.rsplit("-s", 1)[0]


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def points(rows: list[RunRow]) -> list[PointRow]:
    groups: dict[str, list[RunRow]] = {}
    for r in rows:
        groups.setdefault(point_key(r), []).append(r)
    out = []
    for key, rs in groups.items():
        losses = [r.val_loss for r in rs if r.val_loss is not None]
        scores = [r.gm_edges for r in rs if r.gm_edges is not None]
        nz = [r.nonzero_params for r in rs if r.nonzero_params is not None]
        common = set.intersection(*(set(r.passing) for r in rs)) if rs else set()
        loss, sd = mean_sd(losses)
        out.append(PointRow(key, rs[0].kind, rs[0].size, rs[0].density, rs[0].steps, len(rs), loss, sd,
                            statistics.fmean(nz) if nz else None, geometric_mean(scores) if scores else None,
                            min(scores) if scores else None, max(scores) if scores else None, len(scores), sorted(common)))
    return out


@dataclass
class Ratio:
    """Sparse edges over dense edges at the sparse point's loss, on the tasks both pass."""

    point: str
    tasks: list[str]
    dense_points: list[str]  # the dense curve it was read from
    ratio: float | None = None  # geometric mean over seeds of the per-seed ratios
    low: float | None = None  # 95% interval over seeds (t on the log ratios)
    high: float | None = None
    per_seed: list[float] = field(default_factory=list)
    why: str = ""  # why there is no ratio


def dense_curve(dense: list[PointRow], rows: list[RunRow], tasks: list[str]) -> list[tuple[float, float, str]]:
    """(mean loss, mean log gm edges over `tasks`) of each dense point whose every finished seed passes `tasks`,
    ordered by loss."""
    curve = []
    for p in dense:
        seeds = [r for r in rows if point_key(r) == p.point and r.val_loss is not None]
        if not seeds or not all(set(tasks) <= set(r.passing) for r in seeds):
            continue
        logs = [math.log(geometric_mean([r.passing[t] for t in tasks])) for r in seeds]
        curve.append((statistics.fmean(r.val_loss for r in seeds), statistics.fmean(logs), p.point))
    return sorted(curve)


def interpolate(curve: list[tuple[float, float, str]], loss: float) -> float | None:
    """Log edges of the dense curve at `loss` (linear in loss between the two points around it; None outside)."""
    for (l0, e0, _), (l1, e1, _) in zip(curve, curve[1:]):
        if l0 <= loss <= l1:
            return e0 if l1 == l0 else e0 + (e1 - e0) * (loss - l0) / (l1 - l0)
    return None


def matched_ratios(rows: list[RunRow]) -> list[Ratio]:
    table = points(rows)
    dense = [p for p in table if p.kind == "dense"]
    out = []
    for p in (p for p in table if p.kind == "sparse"):
        seeds = [r for r in rows if point_key(r) == p.point and r.val_loss is not None]
        res = Ratio(p.point, p.tasks, [])
        if not p.tasks:
            res.why = "no task passes in every seed"
            out.append(res)
            continue
        curve = dense_curve(dense, rows, p.tasks)
        res.dense_points = [name for _, _, name in curve]
        if len(curve) < 2:
            res.why = f"{len(curve)} dense point(s) pass {', '.join(p.tasks)} in every seed; a curve needs 2"
            out.append(res)
            continue
        for r in seeds:
            at = interpolate(curve, r.val_loss)
            if at is not None:
                res.per_seed.append(geometric_mean([r.passing[t] for t in p.tasks]) / math.exp(at))
        if not res.per_seed:
            res.why = (f"its loss lies outside the dense curve's range ({curve[0][0]:.3f}–{curve[-1][0]:.3f}); "
                       f"no extrapolation")
            out.append(res)
            continue
        logs = [math.log(x) for x in res.per_seed]
        res.ratio = math.exp(statistics.fmean(logs))
        if len(logs) > 1:
            half = T95.get(len(logs) - 1, 1.96) * statistics.stdev(logs) / math.sqrt(len(logs))
            res.low, res.high = res.ratio * math.exp(-half), res.ratio * math.exp(half)
        out.append(res)
    return out


def as_dicts(items) -> list[dict]:
    return [asdict(x) for x in items]

