"""Training and pruning what a sweep still lacks, through Hydra's launcher plugins.

Both stages are Hydra multiruns of the ordinary commands, started as a child process:

    python train.py --multirun hydra/launcher=<launcher> +frontier_point=<run>,<run>,...   (train.resume=auto)
    python -m sparse_lm.prune --multirun hydra/launcher=<launcher> checkpoint=<ckpt>,<ckpt>,...

so `launcher=basic` runs them one after another here, `submitit_local` as parallel processes, and
`submitit_slurm` as cluster jobs (hydra-submitit-launcher), with no scheduler of our own. A finished run (its
checkpoint at train.max_steps exists) is not launched again; an interrupted one is resumed from its latest checkpoint;
a checkpoint whose circuits were written is not pruned again.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sparse_lm import checkpoint
from sparse_lm.circuits.prune import default_output_dir
from sparse_lm.config import FrontierConfig
from sparse_lm.errors import UserError
from sparse_lm.frontier.grid import GROUP, Point, write_points
from sparse_lm.resume import override_value

REPO = Path(__file__).resolve().parents[2]  # train.py and conf/ sit beside the package


def final_checkpoint(point: Point, sweep: Path) -> Path | None:
    """The run's checkpoint at its last step, if training finished."""
    found = checkpoint.latest(point.run_dir(sweep) / "checkpoints")
    return found if found is not None and checkpoint.step_of(found) >= point.steps else None


def state(point: Point, sweep: Path) -> str:
    """'done' (trained to its last step), 'partial' (checkpoints short of it: resumed) or 'new'."""
    if final_checkpoint(point, sweep) is not None:
        return "done"
    return "partial" if checkpoint.latest(point.run_dir(sweep) / "checkpoints") is not None else "new"


def sweep_list(values: list[str]) -> str:
    """A Hydra sweep over `values`, each quoted when it needs to be."""
    return ",".join(override_value(v) for v in values)


def hydra_run(cmd: list[str], what: str, log) -> None:
    log(f"$ {' '.join(cmd)}")
    proc = subprocess.run(cmd)  # in the caller's directory: relative paths in the overrides mean what they say
    if proc.returncode != 0:
        log(f"{what}: the multirun exited with {proc.returncode}; the runs that finished are kept")


def train_missing(cfg: FrontierConfig, points: list[Point], sweep: Path, log=print) -> list[Point]:
    """Launch every run that is not done (new ones start, partial ones resume); return those launched."""
    todo = [p for p in points if state(p, sweep) != "done"]
    resumed = [p.name for p in todo if state(p, sweep) == "partial"]
    log(f"training: {len(points) - len(todo)} of {len(points)} runs done, {len(todo)} to train"
        + (f" ({len(resumed)} resumed: {', '.join(resumed)})" if resumed else ""))
    if not todo:
        return []
    conf = write_points(points, sweep)
    cmd = [sys.executable, str(REPO / "train.py"), "--multirun", f"hydra/launcher={cfg.launcher}",
           f"hydra.searchpath=[file://{conf.resolve()}]", f"hydra.sweep.dir={(sweep / 'runs').resolve()}",
           "hydra.sweep.subdir=${name}", "train.resume=auto", *cfg.train_overrides, *cfg.launcher_overrides,
           f"+{GROUP}={sweep_list([p.name for p in todo])}"]
    hydra_run(cmd, "training", log)
    return todo


def prune_missing(cfg: FrontierConfig, points: list[Point], sweep: Path, log=print) -> list[Path]:
    """Prune every final checkpoint without circuits yet; return the checkpoints launched."""
    finals = [c for c in (final_checkpoint(p, sweep) for p in points) if c is not None]
    todo = [c for c in finals if not (default_output_dir(c) / "summary.json").exists()]
    log(f"pruning: {len(finals) - len(todo)} of {len(finals)} trained runs pruned, {len(todo)} to prune")
    if not todo:
        return []
    for option in cfg.prune_overrides:
        if option.split("=", 1)[0].lstrip("+") in ("checkpoint", "out_dir", "overwrite"):
            raise UserError(f"prune_overrides: {option!r} is set by the frontier per run; leave it out")
    cmd = [sys.executable, "-m", "sparse_lm.prune", "--multirun", f"hydra/launcher={cfg.launcher}",
           f"hydra.sweep.dir={(sweep / 'prune-jobs').resolve()}", *cfg.prune_overrides, *cfg.launcher_overrides,
           f"checkpoint={sweep_list([str(c) for c in todo])}"]
    hydra_run(cmd, "pruning", log)
    return todo
