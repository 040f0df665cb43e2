"""What a sweep found: one row per run, one per grid point (over seeds), and the sparse/dense ratio at matched loss.

A run's score is the geometric mean of circuit edges over the tasks whose circuits pass the battery the prune ran
(`passes_what_ran` in its summary.json: with controls=all and check=true that is "trusted"). Comparing two models
means comparing them on the same tasks, so the ratio at matched loss uses, for each sparse point, the tasks every one
of its seeds passes, and the dense frontier of the dense points whose every seed passes them too (docs/frontier.md).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sparse_lm import checkpoint
from sparse_lm.circuits.battery import controls_asked, geometric_mean
from sparse_lm.config import PruneConfig
from sparse_lm.frontier.grid import Point
from sparse_lm.metrics import read_metrics
from sparse_lm.roles import nonzeros_by_kind

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96, within 4%).
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t95(df: int) -> float:
    return T95[df - 1] if df <= len(T95) else 1.96


@dataclass
class RunRow:
    run: str
    point: str  # the grid point it is one seed of
    kind: str
    size: str
    density: float | None
    seed: int
    steps: int
    trained_steps: int | None = None  # the latest checkpoint's step (None: not started)
    val_loss: float | None = None  # at the final step
    nonzero_params: int | None = None  # nonzero weights, embeddings and biases (not gains, sinks or the bigram table)
    pruned: bool = False
    tasks_solved: list[str] = field(default_factory=list)  # by the whole model
    circuits: dict[str, int] = field(default_factory=dict)  # task -> edges of every circuit found, passing or not
    passing: dict[str, int] = field(default_factory=dict)  # task -> edges of the circuits that pass the battery run
    gm_edges: float | None = None  # geometric mean over `passing`
    gm_edges_all: float | None = None  # over `circuits`
    battery: str = ""  # the tasks, checks and controls the prune ran


def nonzero_params(ckpt: Path) -> int:
    return sum(nz for nz, _ in nonzeros_by_kind(checkpoint.load_weights(ckpt)).values())


def battery_run(summary: dict, config: dict) -> str:
    """What a prune ran, from its summary (and its run.json config, when it has one)."""
    tasks = len(summary["tasks"]) + len(summary["unusable_with_tokenizer"])
    if not config:
        return f"{tasks} tasks, battery unknown (no run.json)"
    asked = sorted(controls_asked(PruneConfig(checkpoint="?", controls=config.get("controls", []))))
    return (f"{tasks} tasks, controls={','.join(asked) or 'none'}, checks={'on' if config.get('check', True) else 'off'}, "
            f"mask seeds={summary.get('seeds')}")


def run_row(point: Point, sweep: Path) -> RunRow:
    row = RunRow(point.name, point.group, point.kind, point.size, point.density, point.seed, point.steps)
    ckpt = checkpoint.latest(point.run_dir(sweep) / "checkpoints")
    if ckpt is None:
        return row
    row.trained_steps = checkpoint.step_of(ckpt)
    if row.trained_steps != point.steps:
        return row
    finals = [r["val_loss"] for r in read_metrics(point.run_dir(sweep) / "metrics.jsonl") if r.get("step") == point.steps and "val_loss" in r]
    row.val_loss = finals[-1] if finals else None
    row.nonzero_params = nonzero_params(ckpt)
    out = checkpoint.results_dir(ckpt, "circuits")
    if not (out / "summary.json").exists():
        return row
    row.pruned = True
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "run.json").read_text()).get("config", {}) if (out / "run.json").exists() else {}
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

    point: str
    kind: str
    size: str
    density: float | None
    steps: int
    seeds: int
    seeds_pruned: int  # seeds trained to the end and pruned
    val_loss: float | None  # mean over the seeds that finished
    val_loss_sd: float | None
    nonzero_params: float | None
    gm_edges: float | None  # geometric mean over seeds of the runs' scores (seeds without a passing circuit left out)
    gm_edges_min: float | None
    gm_edges_max: float | None
    seeds_scored: int  # seeds with at least one passing circuit
    tasks: list[str]  # tasks passing in every seed (empty until every seed is pruned)


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def group(rows: list[RunRow]) -> dict[str, list[RunRow]]:
    groups: dict[str, list[RunRow]] = {}
    for r in rows:
        groups.setdefault(r.point, []).append(r)
    return groups


def points(rows: list[RunRow]) -> list[PointRow]:
    out = []
    for key, rs in group(rows).items():
        losses = [r.val_loss for r in rs if r.val_loss is not None]
        scores = [r.gm_edges for r in rs if r.gm_edges is not None]
        nz = [r.nonzero_params for r in rs if r.nonzero_params is not None]
        common = set.intersection(*(set(r.passing) for r in rs)) if all(r.pruned for r in rs) else set()
        loss, sd = mean_sd(losses)
        out.append(PointRow(key, rs[0].kind, rs[0].size, rs[0].density, rs[0].steps, len(rs), sum(r.pruned for r in rs), loss, sd,
                            statistics.fmean(nz) if nz else None, geometric_mean(scores) if scores else None,
                            min(scores) if scores else None, max(scores) if scores else None, len(scores), sorted(common)))
    return out


@dataclass
class Ratio:
    """Sparse edges over dense edges at the sparse point's loss, on the tasks both pass."""

    point: str
    tasks: list[str]
    dense_points: list[str]  # the dense frontier it was read from, by loss
    ratio: float | None = None  # geometric mean over seeds of the per-seed ratios
    low: float | None = None  # 95% interval over seeds (t on the log ratios)
    high: float | None = None
    per_seed: dict[int, float] = field(default_factory=dict)  # seed -> its ratio
    left_out: list[int] = field(default_factory=list)  # seeds whose loss lies outside the dense frontier's range
    why: str = ""  # why there is no ratio


def dense_frontier(rows: list[RunRow], tasks: list[str]) -> list[tuple[float, float, str]]:
    """(mean loss, mean log geometric-mean edges over `tasks`) of the dense points all of whose seeds are pruned and
    pass `tasks`, keeping only the frontier: a point stays if no point of lower (or equal) loss has fewer edges.
    Ordered by loss; log edges then fall as loss rises, whatever mix of sizes and lengths it came from."""
    curve = []
    for key, rs in group(rows).items():
        if rs[0].kind != "dense" or not all(r.pruned and r.val_loss is not None and set(tasks) <= set(r.passing) for r in rs):
            continue
        logs = [math.log(geometric_mean([r.passing[t] for t in tasks])) for r in rs]
        curve.append((statistics.fmean(r.val_loss for r in rs), statistics.fmean(logs), key))
    frontier = []
    for loss, edges, key in sorted(curve):
        if not frontier or edges < frontier[-1][1]:
            frontier.append((loss, edges, key))
    return frontier


def interpolate(curve: list[tuple[float, float, str]], loss: float) -> float | None:
    """Log edges of the curve at `loss` (linear in loss between the two points around it; None outside)."""
    for (l0, e0, _), (l1, e1, _) in zip(curve, curve[1:]):
        if l0 <= loss <= l1:
            return e0 if l1 == l0 else e0 + (e1 - e0) * (loss - l0) / (l1 - l0)
    return None


def matched_ratio(key: str, seeds: list[RunRow], rows: list[RunRow]) -> Ratio:
    unready = [r.seed for r in seeds if not r.pruned]
    if unready:
        return Ratio(key, [], [], why=f"seed(s) {unready} not trained to the end and pruned yet")
    tasks = sorted(set.intersection(*(set(r.passing) for r in seeds)))
    res = Ratio(key, tasks, [])
    if not tasks:
        res.why = "no task passes in every seed"
        return res
    curve = dense_frontier(rows, tasks)
    res.dense_points = [name for _, _, name in curve]
    if len(curve) < 2:
        res.why = f"the dense frontier on {', '.join(tasks)} has {len(curve)} point(s) whose every seed passes them; it needs 2"
        return res
    for r in seeds:
        at = interpolate(curve, r.val_loss)
        if at is None:
            res.left_out.append(r.seed)
        else:
            res.per_seed[r.seed] = geometric_mean([r.passing[t] for t in tasks]) / math.exp(at)
    if not res.per_seed:
        res.why = f"every seed's loss lies outside the dense frontier's range ({curve[0][0]:.3f}–{curve[-1][0]:.3f}); no extrapolation"
        return res
    logs = [math.log(x) for x in res.per_seed.values()]
    res.ratio = math.exp(statistics.fmean(logs))
    if len(logs) > 1:
        half = t95(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
        res.low, res.high = res.ratio * math.exp(-half), res.ratio * math.exp(half)
    return res


def matched_ratios(rows: list[RunRow]) -> list[Ratio]:
    return [matched_ratio(key, rs, rows) for key, rs in group(rows).items() if rs[0].kind == "sparse"]


def as_dicts(items) -> list[dict]:
    return [asdict(x) for x in items]
