"""A frontier sweep end to end: expand the grid, train what is missing, prune what is unpruned, collect.

    run(cfg) → grid.expand → launch.train_missing → launch.prune_missing → table → frontier.{csv,json,png}, summary.txt

Every stage looks at what the sweep directory already holds, so running the same command again only re-collects,
and an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from omegaconf import OmegaConf

from sparse_lm.circuits.report import fmt
from sparse_lm.config import FrontierConfig, Stage
from sparse_lm.errors import UserError
from sparse_lm.frontier import launch, plot, table
from sparse_lm.frontier.grid import expand
from sparse_lm.fsutil import atomic_file, write_json, write_text

RUN_COLUMNS = ("run", "point", "kind", "size", "density", "seed", "steps", "trained_steps", "val_loss", "nonzero_params",
               "pruned", "tasks_solved", "passing", "gm_edges", "gm_edges_all", "battery")
POINT_COLUMNS = ("point", "kind", "size", "density", "steps", "seeds", "seeds_pruned", "val_loss", "val_loss_sd", "nonzero_params",
                 "gm_edges", "gm_edges_min", "gm_edges_max", "seeds_scored", "tasks")


def as_csv(items, columns) -> str:
    """Rows of dataclasses as CSV; lists joined by spaces, {task: edges} as task:edges."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    for d in table.as_dicts(items):
        cells = []
        for c in columns:
            v = d[c]
            cells.append(" ".join(f"{k}:{e}" for k, e in v.items()) if isinstance(v, dict) else " ".join(v) if isinstance(v, list) else v)
        w.writerow(cells)
    return buf.getvalue()


def summary_text(pts: list[table.PointRow], ratios: list[table.Ratio], battery: str) -> str:
    lines = [f"circuits counted: those passing the battery each prune ran ({battery or 'no prune yet'})",
             f"{'point':<26} {'seeds':>5} {'pruned':>6} {'val loss':>14} {'nonzero':>9} {'gm edges [min, max]':>24} {'scored':>6}  "
             f"tasks passing in every seed"]
    for p in pts:
        loss = f"{fmt(p.val_loss)} ± {fmt(p.val_loss_sd)}"
        gm = f"{fmt(p.gm_edges, '{:.0f}')} [{fmt(p.gm_edges_min, '{:.0f}')}, {fmt(p.gm_edges_max, '{:.0f}')}]"
        lines.append(f"{p.point:<26} {p.seeds:>5} {p.seeds_pruned:>6} {loss:>14} {fmt(p.nonzero_params, '{:.0f}'):>9} {gm:>24} "
                     f"{p.seeds_scored:>6}  " + (", ".join(p.tasks) or "-"))
    lines += ["", "sparse/dense edges at matched loss (the dense frontier interpolated in log edges at each seed's loss; "
                  "95% t interval over seeds)"]
    for r in ratios:
        if r.ratio is None:
            lines.append(f"{r.point:<26} no ratio: {r.why}")
            continue
        ci = f"[{r.low:.3g}, {r.high:.3g}]" if r.low is not None else "(one seed: no interval)"
        seeds = ", ".join(f"seed {s}: {x:.3g}" for s, x in r.per_seed.items())
        out = f"; seeds {r.left_out} left out (loss outside the dense frontier)" if r.left_out else ""
        lines.append(f"{r.point:<26} {r.ratio:.3g} {ci} on {', '.join(r.tasks)} ({seeds}{out}); dense frontier: {', '.join(r.dense_points)}")
    return "\n".join(lines)


def run(cfg: FrontierConfig, log=print) -> dict:
    sweep = Path(cfg.sweep_dir)
    points = expand(cfg)
    sweep.mkdir(parents=True, exist_ok=True)
    write_text(sweep / "frontier.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    log(f"sweep {sweep}: {len(points)} runs ({sum(p.kind == 'sparse' for p in points)} sparse, "
        f"{sum(p.kind == 'dense' for p in points)} dense), launcher {cfg.launcher}")
    if cfg.stage in (Stage.all, Stage.train):
        launch.train_missing(cfg, points, sweep, log)
    if cfg.stage == Stage.all:
        launch.prune_missing(cfg, points, sweep, log)
    rows = [table.run_row(p, sweep) for p in points]
    pts, ratios = table.points(rows), table.matched_ratios(rows)
    battery = "; ".join(sorted({r.battery for r in rows if r.battery}))
    result = {"config": OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True), "runs": table.as_dicts(rows),
              "points": table.as_dicts(pts), "ratios": table.as_dicts(ratios)}
    write_json(sweep / "frontier.json", result)
    write_text(sweep / "frontier.csv", as_csv(rows, RUN_COLUMNS))
    write_text(sweep / "frontier_points.csv", as_csv(pts, POINT_COLUMNS))
    text = summary_text(pts, ratios, battery)
    write_text(sweep / "summary.txt", text + "\n")
    with atomic_file(sweep / "frontier.png") as tmp:
        plot.draw(pts, rows, tmp, f"{sweep.name}: {len(points)} runs; circuits passing: {battery or 'not pruned'}")
    log(text)
    log(f"wrote {sweep}/frontier.csv, frontier_points.csv, frontier.json, frontier.png, summary.txt")
    unfinished = [r.run for r in rows if r.val_loss is None]
    unpruned = [r.run for r in rows if r.val_loss is not None and not r.pruned]
    missing = (unfinished if cfg.stage != Stage.collect else []) + (unpruned if cfg.stage == Stage.all else [])
    if missing:  # after the table: what did finish is collected, and the command still fails
        raise UserError(f"{len(missing)} run(s) not {'trained and pruned' if cfg.stage == Stage.all else 'trained'}: {', '.join(missing)}; "
                        f"see <run>/train.log and the launcher's output above, then run the same command again")
    return result
