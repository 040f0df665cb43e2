"""`python -m sparse_lm.inspect` and `python -m sparse_lm.sample` on checkpoints of a real run."""

import shutil
import subprocess
import sys

import torch

from sparse_lm import checkpoint
from sparse_lm.inspect import inspect_checkpoint
from tests.conftest import REPO, run_train


def tool(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_inspect_passes_a_real_run_and_fails_a_tampered_checkpoint(tiny_run, tmp_path):
    proc = tool("sparse_lm.inspect", str(tiny_run))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every parameter matches its schedule" in proc.stdout and "blocks.1.mlp.c_fc.weight" in proc.stdout
    _, rows = inspect_checkpoint(tiny_run)
    fc = next(r for r in rows if r.name == "blocks.0.mlp.c_fc.weight")
    assert fc.k == fc.nonzeros == 128 * 32 // 4 and fc.min_per_neuron >= fc.j == 4

    bad = tmp_path / "tampered"
    shutil.copytree(checkpoint.resolve(tiny_run), bad)
    weights = torch.load(bad / "model.pt", weights_only=True)
    w = weights["blocks.1.attn.c_proj.weight"]
    zero = tuple((w == 0).nonzero()[0].tolist())
    w[zero] = 0.5  # one weight too many
    torch.save(weights, bad / "model.pt")
    proc = tool("sparse_lm.inspect", str(bad))
    assert proc.returncode == 1 and "1 parameter(s) deviate from the schedule: blocks.1.attn.c_proj.weight" in proc.stdout

    w[zero] = 0.0
    weights["blocks.0.mlp.c_fc.weight"][7] = 0  # neuron 7 loses all its inputs
    torch.save(weights, bad / "model.pt")
    _, rows = inspect_checkpoint(bad)
    assert [r.name for r in rows if not r.ok] == ["blocks.0.mlp.c_fc.weight"]


def test_sample_prints_seeded_completions(tiny_run):
    args = ("sparse_lm.sample", str(tiny_run), "prompt='def '", "max_new_tokens=20", "num_samples=2", "seed=3")
    first, again = tool(*args), tool(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout and first.stdout.count("----- sample") == 2
    texts = first.stdout.split("-----")[2::2]
    assert all(t.strip().startswith("def") and len(t.strip()) > 5 for t in texts)
    other = tool(*args[:-1], "seed=4")
    assert other.stdout != first.stdout


def test_a_dense_control_run_trains_without_projection(corpus, cache_dir, tmp_path):
    run_train(tmp_path / "dense", corpus, "sparsity=dense", "train.max_steps=4", "train.ckpt_interval=4")
    _, rows = inspect_checkpoint(tmp_path / "dense")
    assert all(r.k is None and r.ok for r in rows)
    fc = next(r for r in rows if r.name == "blocks.0.mlp.c_fc.weight")
    assert fc.nonzeros == 128 * 32


def test_paper_preset_runs_a_few_steps_on_cpu_with_reference_shapes_and_densities(corpus, cache_dir, tmp_path):
    run_dir = tmp_path / "paper"
    run_train(
        # Two of the reference's eight layers: every matrix has its reference shape and density.
        run_dir, corpus, "preset=paper", "data.vocab_size=2048", "model.n_layer=2", "model.d_model=1024", "model.d_mlp=4096",
        "model.ctx_len=256", "sparsity.hidden_density=0.015625", "sparsity.embed_density=0.0625",
        "train.batch_size=2", "train.micro_batch_size=1", "train.max_steps=2", "train.compile=false", "train.eval_sequences=2",
    )
    _, rows = inspect_checkpoint(run_dir)
    by_name = {r.name: r for r in rows}
    assert all(r.ok for r in rows)
    assert by_name["blocks.1.attn.c_attn.weight"].shape == (3 * 1024, 1024)  # 64 heads of 16
    assert by_name["blocks.1.mlp.c_fc.weight"].shape == (4096, 1024)
    assert by_name["blocks.1.mlp.c_fc.weight"].nonzeros == 4096 * 1024 // 64
    assert by_name["wte.weight"].nonzeros == 2048 * 1024 // 16 == by_name["lm_head.weight"].nonzeros
    assert by_name["bigram"].shape == (2048, 2048) and by_name["blocks.0.attn.sink"].shape == (64,)
