"""The CUDA path (bf16 autocast, fused Adam, MFU logging); skipped on machines without a GPU."""

import math

import pytest

from sparse_lm.inspect import inspect_checkpoint
from sparse_lm.metrics import read_metrics
from tests.conftest import run_train

pytestmark = pytest.mark.gpu


def test_a_short_bf16_run_on_cuda(corpus, tmp_path):
    run_dir = tmp_path / "cuda"
    run_train(run_dir, corpus, "train.device=cuda", "train.precision=bf16", "train.max_steps=8", "train.ckpt_interval=8")
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 8 and all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    _, params = inspect_checkpoint(run_dir)
    assert all(p.ok for p in params)
