"""End-to-end runs of `python train.py` (real Hydra, data cache, checkpoints, TensorBoard files, torchrun)."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from sparse_lm import checkpoint
from sparse_lm.metrics import read_metrics
from tests.conftest import REPO, TINY, run_train


def final_weights(run_dir):
    return checkpoint.load_weights(checkpoint.resolve(run_dir))


def assert_same_run(a, b):
    """Bit-identical weights and identical per-step losses."""
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    la = {r["step"]: r["loss"] for r in read_metrics(a / "metrics.jsonl") if "loss" in r}
    lb = {r["step"]: r["loss"] for r in read_metrics(b / "metrics.jsonl") if "loss" in r}
    assert la == lb and len(la) == 40


def test_a_run_writes_everything_a_researcher_reads(tiny_run):
    rows = read_metrics(tiny_run / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 41))
    assert {"step", "loss", "lr", "density", "tokens_per_sec"} <= train_rows[0].keys()
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert [r["step"] for r in rows if "val_loss" in r] == [20, 40] and all(r["val_bpb"] > 0 for r in rows if "val_bpb" in r)
    assert train_rows[-1]["density"] == 0.25
    log = (tiny_run / "train.log").read_text()
    assert "step 40/40" in log and "ETA" in log and "tok/s" in log
    assert (tiny_run / ".hydra" / "config.yaml").is_file() and (tiny_run / "curves.png").stat().st_size > 10_000
    ckpts = [p.name for p in checkpoint.step_dirs(tiny_run / "checkpoints")]
    assert ckpts == [f"step-{s:06d}" for s in range(5, 41, 5)] and checkpoint.latest(tiny_run / "checkpoints").name == "step-000040"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/bpb", "lr", "grad_norm", "tokens_per_sec", "density/blocks.0.mlp.c_fc.weight"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 41))


def test_resume_after_a_clean_stop_is_bit_identical(tiny_run, corpus, tmp_path):
    run_dir = tmp_path / "stopped"
    common = ["train.max_steps=40", "train.ckpt_interval=5", "train.eval_interval=20"]
    first = run_train(run_dir, corpus, *common, "train.exit_interval=17")
    assert "stopping at step 17" in first.stdout + first.stderr
    assert checkpoint.latest(run_dir / "checkpoints").name == "step-000017"
    run_train(run_dir, corpus, *common, "train.resume=auto")
    assert_same_run(tiny_run, run_dir)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_resume_after_a_signal_is_bit_identical(sig, tiny_run, corpus, tmp_path):
    """SIGTERM (preemption, Ctrl-C) stops after the current step with a checkpoint; SIGKILL loses the steps since
    the last checkpoint. Either way, resuming reproduces the uninterrupted run bit for bit."""
    run_dir = tmp_path / sig.name
    common = ["train.max_steps=40", "train.ckpt_interval=5", "train.eval_interval=20"]
    cmd = [sys.executable, str(REPO / "train.py"), "data=dir", f"data.path={corpus}", *TINY, f"hydra.run.dir={run_dir}", *common]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(line)["step"] >= 12 for line in metrics.read_text().splitlines() if line):
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    assert proc.wait() == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    last_logged = max(json.loads(line)["step"] for line in metrics.read_text().splitlines() if line)
    assert last_logged < 40, "the run ended before the signal arrived"
    resumed_from = checkpoint.step_of(checkpoint.latest(run_dir / "checkpoints"))
    if sig == signal.SIGTERM:
        assert resumed_from == last_logged  # the step under way was finished and saved
    else:  # the kill may land between a step's log row and its checkpoint
        assert resumed_from % 5 == 0 and last_logged - 10 < resumed_from <= last_logged
    run_train(run_dir, corpus, *common, "train.resume=auto")
    assert_same_run(tiny_run, run_dir)  # rows a killed run wrote past its checkpoint were replaced


def test_a_multirun_sweep_trains_each_point_in_its_own_directory(corpus, tmp_path):
    sweep = tmp_path / "sweep"
    run_train(tmp_path / "unused", corpus, "sparsity.hidden_density=0.25,0.5", "train.max_steps=3", f"hydra.sweep.dir={sweep}", multirun=True)
    for job, density in (("0", 0.25), ("1", 0.5)):
        rows = read_metrics(sweep / job / "metrics.jsonl")
        assert rows[-1]["step"] == 3 and rows[-2]["density"] == density
        assert checkpoint.latest(sweep / job / "checkpoints").name == "step-000003"


def test_existing_checkpoints_are_never_overwritten_without_resume(tiny_run, corpus):
    record = (tiny_run / ".hydra" / "config.yaml").read_text()
    proc = run_train(tiny_run, corpus, "train.max_steps=40", "optim.lr=0.5", check=False)
    assert proc.returncode != 0 and "already holds checkpoints" in proc.stderr and "train.resume=auto" in proc.stderr
    assert (tiny_run / ".hydra" / "config.yaml").read_text() == record  # the refused start left the run's record alone
    proc = run_train(tiny_run, corpus, "train.max_steps=40", "train.resume=auto")  # finished: nothing to do
    assert checkpoint.latest(tiny_run / "checkpoints").name == "step-000040"
    rewind = f"train.resume={tiny_run}/checkpoints/step-000020"
    proc = run_train(tiny_run, corpus, "train.max_steps=40", rewind, check=False)
    assert proc.returncode != 0 and "holds checkpoints past step-000020" in proc.stderr


def test_a_diverged_run_stops_before_writing_a_checkpoint(corpus, tmp_path):
    proc = run_train(tmp_path / "nan", corpus, "optim.lr=1e38", "train.max_steps=4", "train.ckpt_interval=2", check=False)
    assert proc.returncode != 0 and "not finite at step 1; stopping before any checkpoint is written" in proc.stderr
    assert checkpoint.latest(tmp_path / "nan" / "checkpoints") is None


def test_bad_overrides_fail_at_once_with_hydras_message(corpus, tmp_path):
    for override, message in [
        ("train.max_stepz=3", "Could not override 'train.max_stepz'"),
        ("train.max_steps=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("model.norm=batch", "Invalid value 'batch'"),
        ("preset=huge", "Could not find 'preset/huge'"),
    ]:
        proc = run_train(tmp_path / "bad", corpus, override, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (override, proc.stderr[-2000:])
    proc = run_train(tmp_path / "bad", corpus, "train.batch_size=6", check=False)
    assert "train.batch_size=6 must be a multiple of train.micro_batch_size=4" in proc.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_torchrun_two_processes_on_gloo_checkpoint_and_resume(corpus, cache_dir, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run_dir = tmp_path / "ddp"
    common = ["train.max_steps=6", "train.ckpt_interval=3", "train.eval_interval=3", "train.device=cpu", "train.micro_batch_size=auto"]
    run_train(run_dir, corpus, *common, "train.exit_interval=3", launcher=torchrun)
    assert checkpoint.latest(run_dir / "checkpoints").name == "step-000003"
    run_train(run_dir, corpus, *common, "train.resume=auto", launcher=torchrun)
    ddp = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
    assert sorted(ddp) == [1, 2, 3, 4, 5, 6]
    assert "2 process(es)" in (run_dir / "train.log").read_text() and "1 micro-batch(es) of 4" in (run_dir / "train.log").read_text()

    # micro_batch_size=auto keeps the global batch: one process (1 micro-batch of 8) sees the same rows as two
    # processes with 4 each, so the losses agree to fp32 reduction noise.
    single = tmp_path / "single"
    run_train(single, corpus, *common)
    assert "1 micro-batch(es) of 8" in (single / "train.log").read_text()
    one = {r["step"]: r["loss"] for r in read_metrics(single / "metrics.jsonl") if "loss" in r}
    assert ddp == pytest.approx(one, rel=1e-4)


def test_a_resume_that_changes_the_trajectory_is_refused_naming_every_field(tiny_run, corpus, tmp_path):
    branch = tmp_path / "branch"
    start = f"train.resume={tiny_run}/checkpoints/step-000020"
    proc = run_train(branch, corpus, "train.max_steps=80", "sparsity.hidden_density=0.5", "model.d_model=64", start, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    for line in ("train.max_steps: 40 (checkpoint) -> 80 (now)", "sparsity.hidden_density: 0.25 (checkpoint) -> 0.5 (now)",
                 "model.d_model: 32 (checkpoint) -> 64 (now)", "train.resume_changes=allow", "at step 20 the schedule moves"):
        assert line in proc.stderr, (line, proc.stderr)
    assert not (branch / ".hydra").exists() and not (branch / "checkpoints").exists()


def test_resume_changes_allow_continues_and_records_the_change(tiny_run, corpus, tmp_path):
    branch = tmp_path / "branch"
    run_train(branch, corpus, "train.max_steps=24", "train.ckpt_interval=5", f"train.resume={tiny_run}/checkpoints/step-000020",
              "train.resume_changes=allow")
    log = (branch / "train.log").read_text()
    assert "resume_changes=allow" in log and "train.max_steps: 40 (checkpoint) -> 24 (now)" in log
    rows = read_metrics(branch / "metrics.jsonl")
    change = [r for r in rows if "resume_changes" in r]
    assert len(change) == 1 and change[0]["step"] == 20 and any("learning-rate factor" in line for line in change[0]["resume_changes"])
    assert [r["step"] for r in rows if "loss" in r] == [21, 22, 23, 24]
    assert checkpoint.latest(branch / "checkpoints").name == "step-000024"


def test_a_damaged_checkpoint_is_named_with_the_intact_one_before_it(tiny_run, corpus, tmp_path):
    import shutil

    run_dir = tmp_path / "damaged"
    shutil.copytree(tiny_run, run_dir, symlinks=True)
    model_pt = run_dir / "checkpoints" / "step-000040" / "model.pt"
    model_pt.write_bytes(model_pt.read_bytes()[:1000])  # a save cut short
    proc = run_train(run_dir, corpus, "train.max_steps=40", "train.resume=auto", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{model_pt} cannot be read" in proc.stderr and str(run_dir / "checkpoints" / "step-000035") in proc.stderr
    inspect = subprocess.run([sys.executable, "-m", "sparse_lm.inspect", str(run_dir)], cwd=REPO, capture_output=True, text=True)
    assert inspect.returncode == 1 and f"{model_pt} cannot be read" in inspect.stderr and len(inspect.stderr.splitlines()) == 1


def test_user_errors_are_one_line_and_the_traceback_is_behind_hydras_switch(corpus, tmp_path):
    proc = run_train(tmp_path / "bad", corpus, "model.afrac=0", check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: model.afrac=0.0 is out of range: it must be in (0, 1]"
    import os

    full = run_train(tmp_path / "bad", corpus, "model.afrac=0", check=False, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr and "UserError: model.afrac=0.0 is out of range" in full.stderr


def test_an_afrac_that_keeps_nothing_at_a_site_is_refused(corpus, tmp_path):
    proc = run_train(tmp_path / "afrac", corpus, "model.afrac=0.01", check=False)  # floor(0.01 * 32) = 0
    assert proc.returncode == 1 and "model.afrac=0.01 keeps none of the 32 channels at attn_in" in proc.stderr
    assert not (tmp_path / "afrac" / "checkpoints").exists()


def test_validation_loss_does_not_depend_on_the_micro_batch_size(corpus, cache_dir, tmp_path):
    from sparse_lm.data.cache import prepare
    from sparse_lm.distributed import Dist
    from sparse_lm.trainer import build_run, evaluate
    from tests.test_config import compose_train

    cfg = compose_train("data=dir", f"data.path={corpus}", *TINY, "train.eval_sequences=64")
    run = build_run(cfg, tmp_path, Dist(), prepare(cfg.data), (4, 2))
    losses = {}
    for micro in (4, 32):
        run.micro = micro  # the memory knob: sequences per forward pass
        losses[micro] = evaluate(run)["val_loss"]
    assert losses[4] == pytest.approx(losses[32], rel=1e-6, abs=0)
