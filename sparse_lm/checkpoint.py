"""Atomic, self-contained checkpoints.

Layout of a run directory's `checkpoints/`:

    step-000200/    model.pt  optimizer.pt  rng.pt  state.json  config.yaml  tokenizer.json
    step-000400/    ...
    latest -> step-000400

Each step directory is written under a temporary name and renamed when complete, then `latest` is swapped
atomically; a crash at any point leaves the previous checkpoint as `latest`. Tensors are saved with
torch.save and read back with `weights_only=True`, so loading never unpickles arbitrary objects.
A checkpoint carries its resolved config and tokenizer, so `sample` and `inspect` need nothing else. A file that
cannot be read is reported by name, with the newest intact checkpoint before it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from sparse_lm.errors import UserError
from sparse_lm.fsutil import atomic_directory, fsync_dir, remove_stale_temporaries, write_json, write_text

STEP_DIR = re.compile(r"^step-(\d+)$")


def step_of(ckpt: Path) -> int:
    return int(STEP_DIR.match(Path(ckpt).name).group(1))


def step_dirs(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not Path(ckpt_root).is_dir():
        return []
    return sorted((p for p in Path(ckpt_root).iterdir() if STEP_DIR.match(p.name) and p.is_dir()), key=step_of)


def latest(ckpt_root: Path) -> Path | None:
    """The checkpoint `latest` points to; if that link is missing or dangling, the newest step directory."""
    link = Path(ckpt_root) / "latest"
    if link.is_dir():
        return link.resolve()
    dirs = step_dirs(ckpt_root)
    return dirs[-1] if dirs else None


def resolve(path: str | Path) -> Path:
    """Accept a run directory, its `checkpoints/` directory, or one checkpoint directory; also a reference model's
    directory or `hf:<owner>/<repo>[/<folder>]` on the Hugging Face Hub (sparse_lm.convert)."""
    if str(path).startswith("hf:"):
        from sparse_lm.convert import cached_conversion, hub_snapshot

        return cached_conversion(hub_snapshot(str(path)))
    p = Path(path).expanduser()
    if (p / "model.pt").is_file():
        return p.resolve()
    from sparse_lm import reference

    if reference.is_reference_dir(p):  # a released model (beeg_config.json + final_model.pt): converted once, cached
        from sparse_lm.convert import cached_conversion

        return cached_conversion(p)
    for root in (p / "checkpoints", p):
        found = latest(root)
        if found is not None:
            return found
    raise UserError(f"{path}: no checkpoint here (expected a run directory, its checkpoints/, or a step-N directory)")


def results_dir(ckpt: Path, tool: str) -> Path:
    """Where a tool writes what it found about a checkpoint by default: <run>/<tool>/step-N for a run's checkpoint,
    <checkpoint>/<tool> for a checkpoint directory on its own."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent / tool / ckpt.name if ckpt.parent.name == "checkpoints" else ckpt / tool


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    config_yaml: str,
    tokenizer: Path,
    keep_last: int,
) -> Path:
    """Write checkpoint `step-NNNNNN` atomically, point `latest` at it, keep the newest `keep_last`."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(ckpt_root)
    final = ckpt_root / f"step-{step:06d}"
    with atomic_directory(final) as tmp:
        torch.save(model.state_dict(), tmp / "model.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        write_json(tmp / "state.json", {**state, "step": step})
        write_text(tmp / "config.yaml", config_yaml)
        shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    point_latest(ckpt_root, final.name)
    for old in step_dirs(ckpt_root)[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def point_latest(ckpt_root: Path, name: str) -> None:
    tmp = ckpt_root / f".latest.tmp{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(name)
    os.replace(tmp, ckpt_root / "latest")
    fsync_dir(ckpt_root)


FILES = ("model.pt", "optimizer.pt", "rng.pt", "state.json", "config.yaml", "tokenizer.json")


def intact(ckpt: Path) -> bool:
    """Whether every file of a checkpoint is there and parses (tensors are mapped, not read)."""
    try:
        for name in FILES:
            path = Path(ckpt) / name
            if name.endswith(".pt"):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            elif name.endswith(".json"):
                json.loads(path.read_text())
            elif not path.is_file():
                return False
        return True
    except Exception:
        return False


def damaged(path: Path, error: Exception) -> UserError:
    """The error for an unreadable checkpoint file: which file, and which earlier checkpoint is intact."""
    ckpt = Path(path).parent
    earlier = [d for d in step_dirs(ckpt.parent) if STEP_DIR.match(ckpt.name) and step_of(d) < step_of(ckpt)]
    good = next((d for d in reversed(earlier) if intact(d)), None)
    hint = (f"the newest intact checkpoint before it is {good}: resume from it with train.resume={good} "
            f"(into another hydra.run.dir, or after deleting {ckpt})" if good else "no earlier checkpoint of this run is intact")
    return UserError(f"{path} cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:160]}); the checkpoint "
                     f"{ckpt.name} is damaged (truncated or overwritten?); {hint}")


def read(path: Path, map_location="cpu"):
    """torch.load (weights only) or json, with a damaged file reported by name."""
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # missing, a truncated zip, a half-written JSON, ...
        raise damaged(path, e) from None


def load_config(ckpt: Path):
    """The checkpoint's config.yaml as a Config."""
    from sparse_lm.config import UnreadableConfig, load_yaml

    try:
        return load_yaml(Path(ckpt) / "config.yaml")
    except UnreadableConfig as e:
        raise damaged(Path(ckpt) / "config.yaml", e) from None


def load_tokenizer(ckpt: Path):
    """The checkpoint's tokenizer."""
    from sparse_lm.data.tokenizer import load_from

    try:
        return load_from(ckpt)  # tokenizer.json, or tiktoken/ for a converted reference model (sparse_lm.convert)
    except UserError:
        raise  # the tiktoken adapter names its directory and what is wrong with it
    except Exception as e:
        raise damaged(Path(ckpt) / "tokenizer.json", e) from None


def load_state(ckpt: Path) -> dict:
    """The checkpoint's state.json (step, tokens, data hashes)."""
    return read(Path(ckpt) / "state.json")


def load_weights(ckpt: Path, map_location="cpu") -> dict[str, torch.Tensor]:
    return read(Path(ckpt) / "model.pt", map_location)


def load(ckpt: Path, map_location="cpu") -> dict:
    """Read everything a resume needs: {'model', 'optimizer', 'rng', 'state'}."""
    ckpt = Path(ckpt)
    return {
        "model": load_weights(ckpt, map_location),
        "optimizer": read(ckpt / "optimizer.pt", map_location),
        "rng": read(ckpt / "rng.pt"),  # RNG states stay on the CPU
        "state": load_state(ckpt),
    }
