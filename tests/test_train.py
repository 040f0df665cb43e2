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
    proc = run_train(tiny_run, corpus, "train.max_steps=40", check=False)
    assert proc.returncode != 0 and "already holds checkpoints" in proc.stderr and "train.resume=auto" in proc.stderr
    proc = run_train(tiny_run, corpus, "train.max_steps=40", "train.resume=auto")  # finished: nothing to do
    assert checkpoint.latest(tiny_run / "checkpoints").name == "step-000040"
    rewind = f"train.resume={tiny_run}/checkpoints/step-000020"
    proc = run_train(tiny_run, corpus, "train.max_steps=40", rewind, check=False)
    assert proc.returncode != 0 and "holds checkpoints past step-000020" in proc.stderr


def test_a_diverged_run_stops_before_writing_a_checkpoint(corpus, tmp_path):
    proc = run_train(tmp_path / "nan", corpus, "optim.lr=inf", "train.max_steps=4", "train.ckpt_interval=2", check=False)
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
    common = ["train.max_steps=6", "train.ckpt_interval=3", "train.eval_interval=3", "train.device=cpu", "train.micro_batch_size=4"]
    run_train(run_dir, corpus, *common, "train.exit_interval=3", launcher=torchrun)
    assert checkpoint.latest(run_dir / "checkpoints").name == "step-000003"
    run_train(run_dir, corpus, *common, "train.resume=auto", launcher=torchrun)
    ddp = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
    assert sorted(ddp) == [1, 2, 3, 4, 5, 6]
    assert "2 process(es)" in (run_dir / "train.log").read_text()

    # One process with 2 micro-batches sees the same rows as 2 processes with 1 each: the same losses.
    single = tmp_path / "single"
    run_train(single, corpus, "train.max_steps=6", "train.ckpt_interval=3", "train.eval_interval=3", "train.device=cpu")
    one = {r["step"]: r["loss"] for r in read_metrics(single / "metrics.jsonl") if "loss" in r}
    assert ddp == pytest.approx(one, rel=1e-4)
