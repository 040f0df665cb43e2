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


def write_data_gym(tokenizer, directory: Path) -> None:
    """One of our byte-level BPEs in GPT-2's file format (encoder.json + vocab.bpe), as tinypython_2k is published:
    ranks in the order tiktoken expects (single bytes first, then the merges), <|endoftext|> last. Both use GPT-2's
    byte-to-character table, so the merges carry over (token ids do not)."""
    import json

    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    rest = [b for b in range(256) if b not in printable]
    char = {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(rest)}}
    encoder = {char[b]: i for i, b in enumerate(printable + rest)}
    merges = [m.split(" ") if isinstance(m, str) else m for m in json.loads(tokenizer.to_str())["model"]["merges"]]
    for a, b in merges:
        encoder[a + b] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "encoder.json").write_text(json.dumps(encoder, ensure_ascii=False))
    (directory / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
