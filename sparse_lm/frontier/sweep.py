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

from sparse_lm.config import FrontierConfig
from sparse_lm.errors import UserError
from sparse_lm.frontier import launch, plot, table
from sparse_lm.frontier.grid import expand
from sparse_lm.fsutil import atomic_file, write_json, write_text

STAGES = ("all", "train", "collect")
COLUMNS = ("run", "kind", "size", "density", "seed", "steps", "trained_steps", "val_loss", "nonzero_params", "tasks_solved",
           "passing", "gm_edges", "gm_edges_all", "battery")


def runs_csv(rows: list[table.RunRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in rows:
        d = table.as_dicts([r])[0]
        d["tasks_solved"] = " ".join(r.tasks_solved)
        d["passing"] = " ".join(f"{t}:{e}" for t, e in r.passing.items())
        w.writerow([d[c] for c in COLUMNS])
    return buf.getvalue()


def _f(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def summary_text(pts: list[table.PointRow], ratios: list[table.Ratio], battery: str) -> str:
    lines = [f"circuits counted: those passing the battery each prune ran ({battery or 'no prune yet'})",
             f"{'point':<26} {'seeds':>5} {'val loss':>14} {'nonzero':>9} {'gm edges [min, max]':>26} {'scored':>6}  tasks passing in every seed"]
    for p in pts:
        loss = f"{_f(p.val_loss)} ± {_f(p.val_loss_sd)}"
        gm = f"{_f(p.gm_edges, '{:.0f}')} [{_f(p.gm_edges_min, '{:.0f}')}, {_f(p.gm_edges_max, '{:.0f}')}]"
        lines.append(f"{p.point:<26} {p.seeds:>5} {loss:>14} {_f(p.nonzero_params, '{:.0f}'):>9} {gm:>26} {p.seeds_scored:>6}  "
                     + (", ".join(p.tasks) or "-"))
    lines += ["", "sparse/dense edges at matched loss (dense curve interpolated in log edges at each seed's loss; 95% t interval over seeds)"]
    for r in ratios:
        if r.ratio is None:
            lines.append(f"{r.point:<26} no ratio: {r.why}")
        else:
            ci = f"[{r.low:.3g}, {r.high:.3g}]" if r.low is not None else "(one seed: no interval)"
            lines.append(f"{r.point:<26} {r.ratio:.3g} {ci} on {', '.join(r.tasks)}; dense curve: {', '.join(r.dense_points)}")
    return "\n".join(lines)


def run(cfg: FrontierConfig, log=print) -> dict:
    if cfg.stage not in STAGES:
        raise UserError(f"stage={cfg.stage!r}: choose one of {STAGES}")
    sweep = Path(cfg.sweep_dir)
    points = expand(cfg)
    sweep.mkdir(parents=True, exist_ok=True)
    write_text(sweep / "frontier.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    log(f"sweep {sweep}: {len(points)} runs ({sum(p.kind == 'sparse' for p in points)} sparse, "
        f"{sum(p.kind == 'dense' for p in points)} dense), launcher {cfg.launcher}")
    if cfg.stage in ("all", "train"):
        launch.train_missing(cfg, points, sweep, log)
    if cfg.stage == "all":
        launch.prune_missing(cfg, points, sweep, log)
    rows = [table.run_row(p, sweep) for p in points]
    missing = [r.run for r in rows if r.val_loss is None]
    if missing:
        log(f"not finished (left out of the table's scores): {', '.join(missing)}; their logs: {sweep / 'runs'}/<run>/train.log")
    pts, ratios = table.points(rows), table.matched_ratios(rows)
    battery = "; ".join(sorted({r.battery for r in rows if r.battery}))
    result = {"config": OmegaConf.to_container(OmegaConf.structured(cfg)), "runs": table.as_dicts(rows),
              "points": table.as_dicts(pts), "ratios": table.as_dicts(ratios)}
    write_json(sweep / "frontier.json", result)
    write_text(sweep / "frontier.csv", runs_csv(rows))
    text = summary_text(pts, ratios, battery)
    write_text(sweep / "summary.txt", text + "\n")
    with atomic_file(sweep / "frontier.png") as tmp:
        plot.draw(pts, rows, tmp, f"{sweep.name}: {len(points)} runs; circuits passing: {battery or 'not pruned'}")
    log(text)
    log(f"wrote {sweep}/frontier.csv, frontier.json, frontier.png, summary.txt")
    return result
