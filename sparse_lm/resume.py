"""Deciding where a run starts, before any work is done: fresh, or from which checkpoint, and with what settings.

A resumed run must follow the trajectory it started on. The density anneal and the learning rate are functions of
step / train.max_steps, so a resume with another max_steps (or density, anneal, lr, batch, model or data) would
silently make the density jump and pruned weights regrow. `check_changes` compares the checkpoint's config with
the new one and refuses such a resume, naming every differing field, unless train.resume_changes=allow.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from sparse_lm import checkpoint
from sparse_lm.config import Config, ResumeChanges
from sparse_lm.errors import UserError
from sparse_lm.schedule import density_at, lr_multiplier

# What defines a run's trajectory: whole sections, or single fields. Everything else (intervals, device,
# precision, micro-batching, kernels) may change between a checkpoint and its resume.
TRAJECTORY = ("model", "data", "sparsity", "optim", "train.max_steps", "train.batch_size", "train.seed")
NOT_TRAJECTORY = ("data.cache_dir",)  # where the token cache lives, not what it holds


def find_resume(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint to start from (None: a fresh start), or a UserError if starting here would overwrite work."""
    resume, ckpts = cfg.train.resume, run_dir / "checkpoints"
    if resume is None:
        existing = checkpoint.latest(ckpts)
        if existing is not None:
            raise UserError(
                f"{run_dir} already holds checkpoints (latest: {existing.name}). Continue it with train.resume=auto, "
                f"or start elsewhere with hydra.run.dir=... or name=..."
            )
        return None
    if resume == "auto":
        return checkpoint.latest(ckpts)
    source = checkpoint.resolve(resume)
    later = [d.name for d in checkpoint.step_dirs(ckpts) if checkpoint.step_of(d) > checkpoint.step_of(source)]
    if later:
        raise UserError(
            f"{run_dir} holds checkpoints past {source.name} ({', '.join(later)}); resuming from {resume} here would "
            f"mix two histories. Use another hydra.run.dir, or delete those checkpoints first."
        )
    return source


def flat(cfg: Config) -> dict[str, object]:
    """Every field as "section.key" -> value (lists and enums as plain values)."""
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True), "")
    return out


def trajectory_changes(old: Config, new: Config) -> dict[str, tuple[object, object]]:
    """Trajectory-defining fields whose values differ: name -> (checkpoint's value, new value)."""
    a, b = flat(old), flat(new)
    defining = [k for k in b if any(k == t or k.startswith(t + ".") for t in TRAJECTORY) and k not in NOT_TRAJECTORY]
    return {k: (a.get(k), b[k]) for k in defining if a.get(k) != b[k]}


def schedule_effect(old: Config, new: Config, step: int) -> str:
    """What the changed schedule does at `step`: hidden density and learning-rate factor, before and after."""

    def at(cfg: Config) -> tuple[float, float]:
        s = cfg.sparsity
        t = step / cfg.train.max_steps
        if not s.enabled:
            return 1.0, lr_multiplier(t, cfg.optim.warmup, 1.0, 1.0)
        density = density_at(t, s.hidden_density, s.anneal_start, s.anneal_end, s.anneal)
        return density, lr_multiplier(t, cfg.optim.warmup, density, s.hidden_density)

    (d0, m0), (d1, m1) = at(old), at(new)
    end = new.train.max_steps
    note = "" if step < end else f"; the run is already past train.max_steps={end}, so there is nothing left to train"
    return (f"at step {step} the schedule moves from hidden density {d0:.4g} to {d1:.4g} and learning-rate factor "
            f"{m0:.3g} to {m1:.3g} (the anneal and the lr are fractions of train.max_steps){note}")


def override_value(value) -> str:
    """A value as a Hydra command-line override writes it."""
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, str) and any(c in value for c in " ,[]{}()=*'\""):
        return "'" + value.replace("'", "\\'") + "'"
    return str(value)


def check_changes(cfg: Config, ckpt: Path) -> list[str]:
    """Refuse a resume that changes the trajectory, unless allowed; return the lines to log when allowed."""
    old = checkpoint.load_config(ckpt)
    changes = trajectory_changes(old, cfg)
    if not changes:
        return []
    step = checkpoint.load_state(ckpt)["step"]
    listed = "\n".join(f"  {k}: {a!r} (checkpoint) -> {b!r} (now)" for k, a, b in ((k, *v) for k, v in changes.items()))
    effect = schedule_effect(old, cfg, step)
    if cfg.train.resume_changes == ResumeChanges.refuse:
        same = " ".join(f"{k}={override_value(a)}" for k, (a, _) in changes.items())
        raise UserError(
            f"train.resume: {ckpt} was trained with other settings that define the run's trajectory:\n{listed}\n"
            f"Resuming with them would change the run mid-way: {effect}.\nTo continue the same run, give the "
            f"checkpoint's values: {same}\nTo branch, resume into a new directory (hydra.run.dir=...) with "
            f"train.resume_changes=allow; to change them here, add train.resume_changes=allow."
        )
    return [f"resume_changes=allow: continuing {ckpt} with changed settings:", *listed.split("\n"), effect]
