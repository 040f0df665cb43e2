"""The runs of a frontier sweep: the grid of a FrontierConfig expanded into named points, each a train.py config.

Every run is an ordinary `train.py` run. Its settings are written as a Hydra config of its own,
<sweep>/conf/frontier_point/<name>.yaml, which the launcher selects with `+frontier_point=<name>`. That way
one multirun can take any list of points (not only a Cartesian product), and the sweep directory records what each run is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from sparse_lm.config import FrontierConfig
from sparse_lm.errors import UserError

GROUP = "frontier_point"  # the config group the points are written to


@dataclass(frozen=True)
class Point:
    name: str
    kind: str  # "sparse" | "dense"
    size: str
    density: float | None  # hidden density (None: dense)
    steps: int
    seed: int
    overrides: tuple[str, ...]  # train.py dot-list overrides of this run (on top of FrontierConfig.train)

    def run_dir(self, sweep: Path) -> Path:
        return sweep / "runs" / self.name


def expand(cfg: FrontierConfig) -> list[Point]:
    """Sparse runs: size × density × seed; dense baselines: dense size × dense steps × seed, in that order."""
    if not cfg.sizes:
        raise UserError("sizes: a frontier needs at least one size (label -> train.py overrides)")
    dense_sizes = list(cfg.sizes) if cfg.dense_sizes is None else list(cfg.dense_sizes)
    unknown = [s for s in dense_sizes if s not in cfg.sizes]
    if unknown:
        raise UserError(f"dense_sizes: {unknown} are not among sizes {list(cfg.sizes)}")
    if not cfg.densities and not cfg.dense_steps:
        raise UserError("densities and dense_steps are both empty: the sweep has no run")
    for label in cfg.sizes:
        if not label.replace("_", "").replace(".", "").isalnum():
            raise UserError(f"sizes: label {label!r} must be letters, digits, '.' or '_' (it names run directories)")
    grid_keys = {"name", "sparsity", "sparsity.hidden_density", "train.max_steps", "train.seed"} | {
        o.split("=", 1)[0] for extra in cfg.sizes.values() for o in extra}
    clash = [o for o in cfg.train_overrides if o.split("=", 1)[0].lstrip("+~") in grid_keys]
    if clash:  # a command-line value would silently win over every run's own
        raise UserError(f"train_overrides: {clash} set what the grid sets per run (sizes, densities, steps, seeds, dense); "
                        f"change the grid instead")
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
