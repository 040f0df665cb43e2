"""The frontier sweep: its grid, the matched-loss ratio on a hand-made table, and real runs through Hydra launchers."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sparse_lm import checkpoint
from sparse_lm.config import FrontierConfig, Stage, register_configs, to_object
from sparse_lm.errors import UserError
from sparse_lm.frontier import sweep
from sparse_lm.frontier.grid import composed, expand, point_yaml
from sparse_lm.frontier.table import RunRow, interpolate, matched_ratios, points
from tests.conftest import REPO, TINY

CONF = REPO / "conf"
register_configs()


def test_the_grid_expands_as_documented():
    cfg = FrontierConfig(name="t", sizes={"a": ["model.d_model=32"], "b": []}, densities=[0.25, 0.5], steps=7, seeds=[0, 3],
                         dense_sizes=["b"], dense_steps=[3, 6])
    pts = expand(cfg)
    assert [p.name for p in pts] == ["a-d0.25-s0", "a-d0.25-s3", "a-d0.5-s0", "a-d0.5-s3", "b-d0.25-s0", "b-d0.25-s3",
                                     "b-d0.5-s0", "b-d0.5-s3", "b-dense-3-s0", "b-dense-3-s3", "b-dense-6-s0", "b-dense-6-s3"]
    assert pts[1].overrides == ("model.d_model=32", "sparsity.hidden_density=0.25", "train.max_steps=7", "train.seed=3")
    assert (pts[-1].kind, pts[-1].density, pts[-1].steps) == ("dense", None, 6)
    dense = OmegaConf.create(point_yaml(pts[-1]))
    assert dense.defaults == [{"override /sparsity": "dense"}] and dense.train.max_steps == 6 and dense.name == "b-dense-6-s3"
    assert "defaults" not in OmegaConf.create(point_yaml(pts[0])) and OmegaConf.create(point_yaml(pts[0])).model.d_model == 32
    # dense_sizes=null: every size gets baselines
    assert len(expand(FrontierConfig(name="t", sizes={"a": [], "b": []}, densities=[], dense_steps=[5]))) == 4


@pytest.mark.parametrize("change, message", [
    (dict(dense_sizes=["c"]), "dense_sizes: ['c'] are not among sizes"),
    (dict(densities=[0.25, 0.25]), "the grid names two runs alike"),
    (dict(train_overrides=["sparsity.hidden_density=0.1"]), "set what the grid sets per run"),
    (dict(train_overrides=["model.d_model=16"]), "set what the grid sets per run"),
    (dict(sizes={"a/b": []}), "label 'a/b' must be"),
])
def test_a_bad_grid_is_refused_by_field(change, message):
    base = dict(name="t", sizes={"a": ["model.d_model=32"]}, densities=[0.25], dense_steps=[3])
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        expand(FrontierConfig(**{**base, **change}))


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "frontier").glob("*.yaml")))
def test_every_preset_composes_and_every_run_of_it_builds(preset, tmp_path):
    """Each run's train.py config, composed through its written point file as its job will compose it, builds, and
    its densities fit the j-rule (`composed` builds every model on the meta device)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = to_object(compose("frontier", overrides=[f"frontier={preset}"]), FrontierConfig)
    pts = expand(cfg)
    assert len({p.seed for p in pts}) >= 2 and any(p.kind == "dense" for p in pts)
    configs = composed(cfg, pts, tmp_path)
    for p in pts:
        c = configs[p.name]
        assert (c.name, c.train.max_steps, c.train.seed, c.sparsity.enabled) == (p.name, p.steps, p.seed, p.kind == "sparse")
        if p.kind == "sparse":
            assert c.sparsity.hidden_density == p.density


def test_a_run_the_grid_cannot_build_is_named_before_anything_starts(tmp_path):
    cfg = FrontierConfig(name="t", sizes={"narrow": ["model.d_model=32", "model.d_mlp=128"]}, densities=[0.01], dense_steps=[])
    with pytest.raises(UserError, match="run narrow-d0.01-s0 .*sizes.narrow"):  # 1% of 32 x 128 < 4 per neuron
        composed(cfg, expand(cfg), tmp_path)
    bad = FrontierConfig(name="t", sizes={"a": ["model.d_modle=32"]}, densities=[0.25], dense_steps=[])
    with pytest.raises(UserError, match="run a-d0.25-s0"):
        composed(bad, expand(bad), tmp_path)


def row(point, kind, loss, passing, seed=0):
    return RunRow(run=f"{point}-s{seed}", point=point, kind=kind, size="x", density=0.1 if kind == "sparse" else None, seed=seed,
                  steps=10, trained_steps=10, val_loss=loss, pruned=True, passing=passing,
                  gm_edges=math.exp(statistics.fmean(math.log(e) for e in passing.values())) if passing else None)


def test_the_matched_loss_ratio_on_a_hand_made_table():
    # Dense: seeds differ (losses 3.9/4.1 with 80/125 edges: mean 4.0, mean log edges = log 100), 3.0 with 1000, a
    # dominated point (loss 3.8 with more edges than the 3.0 one: off the frontier), one that passes only t1.
    rows = [row("dense-a", "dense", 3.9, {"t1": 80, "t2": 80}, 0), row("dense-a", "dense", 4.1, {"t1": 125, "t2": 125}, 1),
            row("dense-b", "dense", 3.0, {"t1": 1000, "t2": 1000}, 0), row("dense-b", "dense", 3.0, {"t1": 1000, "t2": 1000}, 1),
            row("dense-dom", "dense", 3.8, {"t1": 5000, "t2": 5000}, 0), row("dense-dom", "dense", 3.8, {"t1": 5000, "t2": 5000}, 1),
            row("dense-c", "dense", 3.5, {"t1": 5}, 0), row("dense-c", "dense", 3.5, {"t1": 5}, 1),
            row("sp", "sparse", 3.5, {"t1": 10, "t2": 10}, 0), row("sp", "sparse", 3.5, {"t1": 40, "t2": 40, "t3": 1}, 1),
            row("sp", "sparse", 4.5, {"t1": 10, "t2": 10}, 2),  # outside the frontier's loss range: left out, said so
            row("far", "sparse", 2.0, {"t1": 10}, 0), row("none", "sparse", 3.5, {}, 0)]
    # halfway in loss between 100 and 1000 edges, log-linear: sqrt(100 * 1000)
    assert math.isclose(math.exp(interpolate([(3.0, math.log(100), "b"), (4.0, math.log(1000), "a")], 3.5)), 1000 ** 0.5 * 100 ** 0.5)
    assert interpolate([(3.0, 1.0, "b"), (4.0, 2.0, "a")], 4.5) is None
    ratios = {r.point: r for r in matched_ratios(rows)}
    sp = ratios["sp"]
    assert sp.tasks == ["t1", "t2"] and sp.dense_points == ["dense-b", "dense-a"]  # dense-c lacks t2, dense-dom is dominated
    assert sp.left_out == [2] and list(sp.per_seed) == [0, 1]
    assert [round(x, 6) for x in sp.per_seed.values()] == [round(10 / 316.227766, 6), round(40 / 316.227766, 6)]
    assert math.isclose(sp.ratio, 20 / 316.227766, rel_tol=1e-6)  # geometric mean of the seeds
    half = 12.706 * math.log(4) / math.sqrt(2) / math.sqrt(2)  # t(1) * sd of the two log ratios / sqrt(2)
    assert math.isclose(sp.low, sp.ratio * math.exp(-half), rel_tol=1e-9) and math.isclose(sp.high, sp.ratio * math.exp(half), rel_tol=1e-9)
    assert ratios["far"].ratio is None and "outside the dense frontier" in ratios["far"].why
    assert ratios["none"].ratio is None and ratios["none"].why == "no task passes in every seed"
    # the point table: mean and sd of the loss, geometric mean and range of the seeds' scores, tasks of every seed
    sp_point = {p.point: p for p in points(rows)}["sp"]
    assert math.isclose(sp_point.val_loss, 11.5 / 3) and math.isclose(sp_point.val_loss_sd, statistics.stdev([3.5, 3.5, 4.5]))
    assert sp_point.tasks == ["t1", "t2"] and sp_point.seeds_scored == 3 and math.isclose(sp_point.gm_edges_min, 10)
    assert math.isclose(sp_point.gm_edges_max, 40 ** (2 / 3) * 1 ** (1 / 3))  # seed 1 also passes t3 with 1 edge
    # a seed not yet pruned: no ratio, and the reason says so
    rows[9] = RunRow(run="sp-s1", point="sp", kind="sparse", size="x", density=0.1, seed=1, steps=10, trained_steps=4)
    assert matched_ratios(rows)[0].why == "seed(s) [1] not trained to the end and pruned yet"


def frontier_cfg(tmp_path: Path, corpus: Path, **kw) -> FrontierConfig:
    """Two tiny sparse runs of 4 steps (seeds 0 and 1), pruned on one task with one mask step."""
    train = ["data=dir", f"data.path={corpus}", "train.eval_interval=2", "train.ckpt_interval=2",
             *[o for o in TINY if not o.startswith("sparsity.hidden_density")]]
    base = dict(name="t", sweep_dir=str(tmp_path / "sweep"), train_overrides=train, sizes={"s": []}, densities=[0.25], steps=4,
                seeds=[0, 1], dense_steps=[], prune_overrides=["tasks=[single_double_quote]", "steps=2", "n_train=32", "n_test=16",
                                                     "n_calib=16", "mean_sequences=4"])
    return FrontierConfig(**{**base, **kw})


def test_the_local_launcher_trains_and_prunes_two_real_runs_and_a_second_call_only_collects(tmp_path, corpus, capsys):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    cfg = frontier_cfg(tmp_path, corpus, launcher="submitit_local", launcher_overrides=["hydra.launcher.timeout_min=10"])
    sweep.run(cfg)
    out = Path(cfg.sweep_dir)
    runs = [out / "runs" / name for name in ("s-d0.25-s0", "s-d0.25-s1")]
    finals = [checkpoint.latest(r / "checkpoints") for r in runs]
    assert [checkpoint.step_of(c) for c in finals] == [4, 4]
    assert list((out / "runs" / ".submitit").iterdir())  # the jobs went through submitit, as processes of their own
    summaries = [json.loads((r / "circuits" / "step-000004" / "summary.json").read_text()) for r in runs]
    assert all(s["tasks"][0]["task"] == "single_double_quote" for s in summaries)
    table = json.loads((out / "frontier.json").read_text())
    assert [r["run"] for r in table["runs"]] == ["s-d0.25-s0", "s-d0.25-s1"]
    assert all(r["val_loss"] is not None and r["nonzero_params"] > 0 and r["pruned"] for r in table["runs"])
    assert "controls=none" in table["runs"][0]["battery"]
    assert table["points"][0]["seeds_pruned"] == 2 and (out / "frontier.png").stat().st_size > 10_000
    assert (out / "frontier.csv").read_text().splitlines()[0].startswith("run,point,kind,size,density,seed")
    assert (out / "frontier_points.csv").read_text().splitlines()[1].startswith("s-d0.25,sparse,s,0.25,4,2,2,")
    stamps = {p: p.stat().st_mtime_ns for r in runs for p in (r / "checkpoints" / "step-000004" / "model.pt",
                                                              r / "circuits" / "step-000004" / "summary.json")}
    capsys.readouterr()
    sweep.run(cfg)
    said = capsys.readouterr().out
    assert "2 of 2 runs done, 0 to train" in said and "2 of 2 trained runs pruned, 0 to prune" in said
    assert "$ " not in said  # no child command was started
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # circuits made with other prune settings are not mixed into the table
    with pytest.raises(UserError, match="holds circuits pruned with other settings .*steps: 2 there, 3 now"):
        sweep.run(frontier_cfg(tmp_path, corpus, prune_overrides=[o.replace("steps=2", "steps=3") for o in cfg.prune_overrides]))
    with pytest.raises(UserError, match="prune_overrides: .*out_dir"):
        sweep.run(frontier_cfg(tmp_path, corpus, prune_overrides=["out_dir=x"]))


def test_an_interrupted_run_is_resumed_not_restarted_and_a_changed_grid_is_refused(tmp_path, corpus, capsys):
    first = frontier_cfg(tmp_path, corpus, seeds=[0], stage=Stage.train)
    first.train_overrides = [*first.train_overrides, "train.exit_interval=2"]  # stops at step 2 of 4, as a killed job would
    with pytest.raises(UserError, match="1 run\\(s\\) not trained: s-d0.25-s0"):  # the table is written, the command fails
        sweep.run(first)
    run = Path(first.sweep_dir) / "runs" / "s-d0.25-s0"
    assert checkpoint.step_of(checkpoint.latest(run / "checkpoints")) == 2
    assert json.loads((Path(first.sweep_dir) / "frontier.json").read_text())["runs"][0]["trained_steps"] == 2
    changed = frontier_cfg(tmp_path, corpus, seeds=[0], stage=Stage.train)
    changed.train_overrides = [*changed.train_overrides, "optim.lr=0.001"]
    with pytest.raises(UserError, match="run s-d0.25-s0: .* other settings \\(optim.lr: 0.025 there, 0.001 now\\)"):
        sweep.run(changed)
    capsys.readouterr()
    sweep.run(frontier_cfg(tmp_path, corpus, seeds=[0], stage=Stage.train))
    assert "1 to train (1 resumed: s-d0.25-s0)" in capsys.readouterr().out
    assert checkpoint.step_of(checkpoint.latest(run / "checkpoints")) == 4
    assert "resumed from" in (run / "train.log").read_text()


def test_a_launch_that_fails_fails_the_command_by_run(tmp_path, corpus):
    with pytest.raises(UserError, match="2 run\\(s\\) not trained and pruned: s-d0.25-s0, s-d0.25-s1"):
        sweep.run(frontier_cfg(tmp_path, corpus, launcher="no_such_launcher"))


def test_the_command_collects_an_empty_sweep_without_training(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sparse_lm.frontier", "frontier=cpu", f"sweep_dir={tmp_path / 'sw'}", "stage=collect"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "d64-d0.25                      2      0" in proc.stdout  # two seeds, none pruned
    assert "no ratio: seed(s) [0, 1] not trained to the end and pruned yet" in (tmp_path / "sw" / "summary.txt").read_text()
    assert not (tmp_path / "sw" / "runs").exists()
