"""The runs of a frontier sweep: the grid of a FrontierConfig expanded into named points, each a train.py config.

Every run is an ordinary `train.py` run. Its settings are written as a Hydra config of its own,
<sweep>/conf/frontier_point/<name>.yaml, which the launcher selects with `+frontier_point=<name>`. That way
one multirun can take any list of points (not only a Cartesian product), and the sweep directory records what each run is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sparse_lm.cli import CHECKOUT, compose_fresh
from sparse_lm.config import Config, FrontierConfig, to_object
from sparse_lm.errors import UserError
from sparse_lm.resume import override_value

GROUP = "frontier_point"  # the config group the points are written to


@dataclass(frozen=True)
class Point:
    name: str
    kind: str  # "sparse" | "dense"
    size: str
    density: float | None  # hidden density (None: dense)
    steps: int
    seed: int
    overrides: tuple[str, ...]  # train.py dot-list overrides of this run (on top of FrontierConfig.train_overrides)

    @property
    def group(self) -> str:
        """The grid point this run is one seed of."""
        return self.name.rsplit("-s", 1)[0]

    def run_dir(self, sweep: Path) -> Path:
        return sweep / "runs" / self.name


GRID_KEYS = ("name", "sparsity", "sparsity.hidden_density", "train.max_steps", "train.seed")  # set per run by the grid
PLAIN = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+=")  # group.key=value, nothing else


def check_grid(cfg: FrontierConfig) -> list[str]:
    """The dense sizes, after refusing a grid that would not say what it means."""
    if not cfg.sizes:
        raise UserError("sizes: a frontier needs at least one size (label -> train.py overrides)")
    if not cfg.seeds:
        raise UserError("seeds: empty; every point needs at least one training seed")
    dense_sizes = list(cfg.sizes) if cfg.dense_sizes is None else list(cfg.dense_sizes)
    unknown = [s for s in dense_sizes if s not in cfg.sizes]
    if unknown:
        raise UserError(f"dense_sizes: {unknown} are not among sizes {list(cfg.sizes)}")
    if not cfg.densities and not (dense_sizes and cfg.dense_steps):
        raise UserError("densities is empty and there are no dense baselines (dense_sizes x dense_steps): the sweep has no run")
    for label, extra in cfg.sizes.items():
        if not label.replace("_", "").replace(".", "").isalnum():
            raise UserError(f"sizes: label {label!r} must be letters, digits, '.' or '_' (it names run directories)")
        bad = [o for o in extra if not PLAIN.match(o) or o.split("=", 1)[0] in GRID_KEYS]
        if bad:
            raise UserError(f"sizes.{label}: {bad} must be plain group.key=value settings of the model, not one the grid "
                            f"sets per run ({', '.join(GRID_KEYS)})")
    size_keys = {o.split("=", 1)[0] for extra in cfg.sizes.values() for o in extra}
    clash = [o for o in cfg.train_overrides if o.split("=", 1)[0].lstrip("+~") in set(GRID_KEYS) | size_keys]
    if clash:  # a command-line value would silently win over every run's own
        raise UserError(f"train_overrides: {clash} set what the grid sets per run (sizes, densities, steps, seeds, dense); "
                        f"change the grid instead")
    return dense_sizes


def expand(cfg: FrontierConfig) -> list[Point]:
    """Sparse runs: size × density × seed; dense baselines: dense size × dense steps × seed, in that order."""
    dense_sizes = check_grid(cfg)
    points = []
    for size, extra in cfg.sizes.items():
        for density in cfg.densities:
            for seed in cfg.seeds:
                points.append(Point(f"{size}-d{density:g}-s{seed}", "sparse", size, density, cfg.steps, seed,
                                    (*extra, f"sparsity.hidden_density={density}", f"train.max_steps={cfg.steps}", f"train.seed={seed}")))
    for size in dense_sizes:
        for steps in cfg.dense_steps:
            for seed in cfg.seeds:
                points.append(Point(f"{size}-dense-{steps}-s{seed}", "dense", size, None, steps, seed,
                                    (*cfg.sizes[size], f"train.max_steps={steps}", f"train.seed={seed}")))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise UserError(f"the grid names two runs alike ({sorted({n for n in names if names.count(n) > 1})}): "
                        f"repeated densities, seeds or dense_steps?")
    return points


def point_yaml(point: Point) -> str:
    """The run's Hydra config: its overrides as values, and `sparsity=dense` for a dense baseline."""
    values = OmegaConf.to_container(OmegaConf.from_dotlist([f"name={point.name}", *point.overrides]))
    head = "# @package _global_\n# Written by sparse_lm.frontier: one run of the sweep (train.py +frontier_point=<this file's name>).\n"
    defaults = "defaults:\n  - override /sparsity: dense\n" if point.kind == "dense" else ""
    return head + defaults + OmegaConf.to_yaml(values)


def write_points(points: list[Point], sweep: Path) -> Path:
    """Write every point's config under <sweep>/conf; return that directory (a Hydra search path)."""
    conf = sweep / "conf"
    (conf / GROUP).mkdir(parents=True, exist_ok=True)
    for p in points:
        path = conf / GROUP / f"{p.name}.yaml"
        text = point_yaml(p)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    return conf


def composed(cfg: FrontierConfig, points: list[Point], sweep: Path) -> dict[str, Config]:
    """Each run's train.py config, composed exactly as its job will compose it (written point file, shared overrides),
    and its model and sparsity built on the meta device: a typo or a density the j-rule cannot meet fails here, naming
    the run, before any job starts."""
    from sparse_lm.model import GPT
    from sparse_lm.sparsity import Sparsifier

    conf = write_points(points, sweep)
    searchpath = f"hydra.searchpath=[{override_value('file://' + str(conf.resolve()))}]"

    def one(p: Point) -> Config:
        try:
            train = to_object(compose_fresh(CHECKOUT / "conf", "config", [searchpath, *cfg.train_overrides, f"+{GROUP}={p.name}"]))
            with torch.device("meta"):
                Sparsifier(GPT(train.model), train.sparsity, train.train.max_steps)
            return train
        except Exception as e:
            raise UserError(f"run {p.name} (sizes.{p.size}, train_overrides): {str(e).splitlines()[0]}") from None

    return {p.name: one(p) for p in points}
