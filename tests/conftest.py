"""Shared fixtures: a small real corpus, an isolated token cache, and a helper that launches `train.py`."""

from __future__ import annotations

import os

import torch

# Kernel tests run on the GPU when there is one; without, in Triton's interpreter on the CPU, which must be
# chosen before kernels/ is imported.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_lm.data.sources import stdlib_root

REPO = Path(__file__).resolve().parents[1]

# A model small enough that a training step takes milliseconds, with every feature of the reference on.
TINY = [
    "model.n_layer=2",
    "model.d_model=32",
    "model.d_mlp=128",
    "model.ctx_len=64",  # the circuit tasks' contexts (up to ~52 tokens with this tokenizer) fit
    "data.vocab_size=512",
    "sparsity.hidden_density=0.25",
    "sparsity.embed_density=0.25",
    "train.batch_size=8",
    "train.micro_batch_size=4",
    "train.log_interval=1",
    "train.eval_sequences=8",
]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """About 120 real Python files from the standard library, in a directory of their own."""
    root = tmp_path_factory.mktemp("corpus")
    files = sorted(p for p in stdlib_root().glob("*.py") if 2_000 < p.stat().st_size < 60_000)[:120]
    for p in files:
        shutil.copy(p, root / p.name)
    (root / "pkg").mkdir()
    (root / "pkg" / "mod.py").write_text("def f(x):\n    return x + 1\n")
    return root


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    os.environ["SPARSE_LM_CACHE"] = str(path)  # inherited by every subprocess the tests start
    return path


def run_train(run_dir: Path, corpus: Path, *overrides: str, check=True, launcher=None, multirun=False, **kw):
    """Run `python train.py` (or a launcher such as torchrun) on the test corpus; return the CompletedProcess."""
    cmd = (launcher or [sys.executable]) + [
        str(REPO / "train.py"),
        *(["--multirun"] if multirun else []),
        "data=dir",
        f"data.path={corpus}",
        *TINY,
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus, cache_dir) -> Path:
    """One uninterrupted 40-step run, checkpointing every 5 steps: the reference for the resume tests."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    run_train(run_dir, corpus, "train.max_steps=40", "train.ckpt_interval=5", "train.eval_interval=20", "train.keep_last=20")
    return run_dir


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
