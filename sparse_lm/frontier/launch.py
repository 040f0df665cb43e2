"""Training and pruning what a sweep still lacks, through Hydra's launcher plugins.

Both stages are Hydra multiruns of the ordinary commands, started as a child process:

    python train.py --multirun hydra/launcher=<launcher> +frontier_point=<run>,<run>,...   (train.resume=auto)
    python -m sparse_lm.prune --multirun hydra/launcher=<launcher> checkpoint=<ckpt>,<ckpt>,...

so `launcher=basic` runs them one after another here, `submitit_local` as parallel processes, and
`submitit_slurm` as cluster jobs (hydra-submitit-launcher), with no scheduler of our own. Before anything starts,
every run's config is composed and compared with what its directory already holds: a finished run (its checkpoint at
train.max_steps) is not launched again, an interrupted one is resumed from its latest checkpoint, a checkpoint whose
circuits were written is not pruned again, and a run or circuits made with other settings stop the sweep, named.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from sparse_lm import checkpoint
from sparse_lm.cli import CHECKOUT, compose_fresh
from sparse_lm.config import Config, FrontierConfig, PruneConfig, to_object
from sparse_lm.errors import UserError
from sparse_lm.frontier.grid import GROUP, Point, composed, write_points
from sparse_lm.resume import override_value, trajectory_changes

PER_RUN = ("checkpoint", "out_dir", "overwrite")  # prune settings the frontier sets for each run


def final_checkpoint(point: Point, sweep: Path) -> Path | None:
    """The run's checkpoint at its last step, if training finished."""
    found = checkpoint.latest(point.run_dir(sweep) / "checkpoints")
    return found if found is not None and checkpoint.step_of(found) == point.steps else None


def state(point: Point, sweep: Path) -> str:
    """'done' (trained to its last step), 'partial' (checkpoints short of it: resumed) or 'new'."""
    if final_checkpoint(point, sweep) is not None:
        return "done"
    return "partial" if checkpoint.latest(point.run_dir(sweep) / "checkpoints") is not None else "new"


def check_existing(points: list[Point], configs: dict[str, Config], sweep: Path) -> None:
    """Refuse a sweep whose run directories were made with other settings than the grid now gives them."""
    for p in points:
        latest = checkpoint.latest(p.run_dir(sweep) / "checkpoints")
        if latest is None:
            continue
        changes = trajectory_changes(checkpoint.load_config(latest), configs[p.name])
        if changes:
            listed = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in changes.items())
            raise UserError(f"run {p.name}: {latest} was trained with other settings ({listed}). A sweep's runs keep "
                            f"their settings: choose a new sweep_dir for a new grid, or restore the old one")


def hydra_run(cmd: list[str], log) -> int:
    log(f"$ {shlex.join(cmd)}")
    return subprocess.run(cmd).returncode  # in the caller's directory: relative paths in the overrides mean what they say


def train_missing(cfg: FrontierConfig, points: list[Point], sweep: Path, log=print) -> list[Point]:
    """Launch every run that is not done (new ones start, partial ones resume); return those launched."""
    configs = composed(cfg, points, sweep)  # every run's config composes and builds, or nothing starts
    check_existing(points, configs, sweep)
    states = {p.name: state(p, sweep) for p in points}
    todo = [p for p in points if states[p.name] != "done"]
    resumed = [p.name for p in todo if states[p.name] == "partial"]
    log(f"training: {len(points) - len(todo)} of {len(points)} runs done, {len(todo)} to train"
        + (f" ({len(resumed)} resumed: {', '.join(resumed)})" if resumed else ""))
    if not todo:
        return []
    conf = write_points(points, sweep)
    cmd = [sys.executable, str(CHECKOUT / "train.py"), "--multirun", f"hydra/launcher={cfg.launcher}",
           f"hydra.searchpath=[{override_value('file://' + str(conf.resolve()))}]",
           f"hydra.sweep.dir={override_value(str((sweep / 'runs').resolve()))}", "hydra.sweep.subdir=${name}", "train.resume=auto",
           *cfg.train_overrides, *cfg.launcher_overrides, f"+{GROUP}={','.join(p.name for p in todo)}"]
    if hydra_run(cmd, log) != 0:
        log("training: the multirun failed; the runs it finished are kept")
    return todo


def prune_config(cfg: FrontierConfig) -> dict:
    """The prune settings every run gets (composed, so a bad override fails before any job), as run.json stores them."""
    for option in cfg.prune_overrides:
        if option.split("=", 1)[0].lstrip("+~") in PER_RUN:
            raise UserError(f"prune_overrides: {option!r} is set by the frontier per run; leave it out")
    try:
        pcfg = to_object(compose_fresh(CHECKOUT / "conf", "prune", [*cfg.prune_overrides, "checkpoint=?"]), PruneConfig)
    except Exception as e:
        raise UserError(f"prune_overrides: {str(e).splitlines()[0]}") from None
    values = OmegaConf.to_container(OmegaConf.structured(pcfg), enum_to_str=True)
    return {k: v for k, v in values.items() if k not in PER_RUN}


def prune_changes(wanted: dict, out: Path) -> dict[str, tuple]:
    """Settings of the circuits in `out` that differ from `wanted` (none known: an older prune without run.json)."""
    run_json = out / "run.json"
    if not run_json.exists():
        return {}
    had = json.loads(run_json.read_text()).get("config", {})
    return {k: (had.get(k), v) for k, v in wanted.items() if k in had and had[k] != v}


def prune_missing(cfg: FrontierConfig, points: list[Point], sweep: Path, log=print) -> list[Path]:
    """Prune every final checkpoint without circuits yet; return the checkpoints launched."""
    wanted = prune_config(cfg)
    finals = [c for c in (final_checkpoint(p, sweep) for p in points) if c is not None]
    done = [c for c in finals if (checkpoint.results_dir(c, "circuits") / "summary.json").exists()]
    for c in done:
        out = checkpoint.results_dir(c, "circuits")
        changes = prune_changes(wanted, out)
        if changes:
            listed = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in changes.items())
            raise UserError(f"{out} holds circuits pruned with other settings ({listed}). A sweep's "
                            f"circuits share one prune setting: choose a new sweep_dir, or delete that directory to re-prune")
    todo = [c for c in finals if c not in done]
    log(f"pruning: {len(done)} of {len(finals)} trained runs pruned, {len(todo)} to prune")
    if not todo:
        return []
    cmd = [sys.executable, "-m", "sparse_lm.prune", "--multirun", f"hydra/launcher={cfg.launcher}",
           f"hydra.sweep.dir={override_value(str((sweep / 'prune-jobs').resolve()))}", *cfg.prune_overrides,
           *cfg.launcher_overrides, f"checkpoint={','.join(override_value(str(c)) for c in todo)}"]
    if hydra_run(cmd, log) != 0:
        log("pruning: the multirun failed; the circuits it wrote are kept")
    return todo
