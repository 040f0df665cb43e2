"""`python -m sparse_lm.bench` on the CPU: the reference backends at small shapes, and the training mode."""

import json
import subprocess
import sys

from tests.conftest import REPO


def bench(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "sparse_lm.bench", f"hydra.run.dir={tmp_path}", "warmup_ms=1", "rep_ms=5", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads((tmp_path / "results.json").read_text())


def test_ops_mode_times_every_reference_side_by_side(tmp_path):
    out, res = bench(tmp_path, "densities=[0.1,0.01]", "cpu_tokens=256", "cpu_shapes=[[64,32]]", "cpu_abstopk_dims=[64]",
                     "cpu_select_shape=[64,64]")
    rows = res["spmm"]
    measured = {(r["op"], r["density"], r["backend"]) for r in rows if "ms" in r}
    for density in (0.1, 0.01):
        for op in ("forward", "dx", "step"):
            assert {(op, density, "dense"), (op, density, "torch_sparse")} <= measured
    assert all(r["speedup"] == 1.0 for r in rows if r["backend"] == "dense")
    assert {r["backend"] for r in res["select"]} == {"torch.topk", "torch.kthvalue", "reference projection"}
    assert res["abstopk"][0]["backend"] == "torch.topk + scatter" and res["abstopk"][0]["k"] == 16
    assert "64x32" in out and "speed-up" in out and (tmp_path / "table.txt").read_text().count("\n") > 12
    assert (tmp_path / "speedup.png").stat().st_size > 20_000


def test_train_mode_times_each_kernels_setting_on_the_same_model(tmp_path):
    out, res = bench(tmp_path, "mode=train", "train_steps=2", "cpu_compare_steps=3",
                     "cpu_train_overrides=['preset=tiny','model.n_layer=1','train.batch_size=2','train.micro_batch_size=2']")
    settings = res["settings"]
    assert list(settings) == ["kernels=default", "kernels.backend=torch_sparse"]
    assert settings["kernels=default"]["matmul_modes"] == ["dense"]
    assert settings["kernels.backend=torch_sparse"]["matmul_modes"] == ["torch_sparse"]
    assert all(s["density"] == 0.0625 and s["tokens_per_sec"] > 0 and len(s["losses"]) == 3 for s in settings.values())
    assert settings["kernels.backend=torch_sparse"]["max_loss_diff"] < 0.05
    assert "tokens/s" in out and (tmp_path / "train.png").stat().st_size > 10_000
