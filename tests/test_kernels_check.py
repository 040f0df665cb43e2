"""`python -m kernels.check` in its reduced mode (no GPU: the interpreter, tiny shapes), as the README prints it, so
the GPU run is never the code's first run: every correctness check, the side-by-side timings, the training-step
comparison through the bench, and one verdict line per target."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="the full mode on a GPU is the device check itself")
def test_reduced_mode_checks_times_and_prints_a_verdict_per_target(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the command sets it itself
    proc = subprocess.run([sys.executable, "-m", "kernels.check", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["reduced"] and len(report["checks"]) >= 30 and all(c["ok"] for c in report["checks"])
    names = " ".join(c["check"] for c in report["checks"])
    for what in ("dX with a random dY", "feature-major X", "Y stored along tokens", "AbsTopK 64x64, float32, random, stored along tokens",
                 "per columns", "undersized capacity", "massive ties", "warm-started"):
        assert what in names, what
    verdict = [line for line in proc.stdout.splitlines() if line.startswith(("MET ", "NOT MET "))]
    assert len(verdict) == len(report["targets"]) == 10
    assert verdict[0].startswith("MET ") and "every correctness check passes" in verdict[0]
    # The step ran its three CPU settings through the bench (no fp32 yardstick: a CPU is in fp32 already); the kernels
    # reproduce the reference losses, token-major and with the MLP interior stored along tokens.
    step = report["step"]
    assert len(step["tokens_per_sec"]) == 3 and step["max_loss_diff"] < 1e-3 and step["max_loss_diff_feature_major"] < 1e-3
    assert all(r["ms"]["triton"] > 0 and r["ms"]["dense"] > 0 for r in report["spmm"])
