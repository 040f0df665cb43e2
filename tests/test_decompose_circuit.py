"""The decomposition-against-circuit comparison (sparse_lm/decompose/circuit.py): its overlap measure by hand, its
input checks, and the command on a small trained model with a hand-made circuit (a real prune of a 40-step model
finds none to compare with)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from sparse_lm import checkpoint
from sparse_lm.decompose.circuit import edge_share, mlp_matrices
from sparse_lm.errors import UserError


def test_edge_share_by_hand():
    inside = torch.zeros(1, 4, 3)
    inside[0, 1, 2] = 3.0  # all its weight on the entry (1, 2)
    uniform = torch.ones(1, 4, 3)
    half = torch.zeros(1, 4, 3)
    half[0, 0, 0], half[0, 1, 2] = 1.0, 1.0
    share = edge_share(torch.cat([inside, uniform, half]), rows=[1, 3], cols=[2])
    assert torch.allclose(share, torch.tensor([1.0, 2 / 12, 0.5]))
    assert edge_share(uniform, rows=[], cols=[2]).item() == 0.0


def test_only_mlp_matrices_of_one_block_are_compared():
    layer, sites = mlp_matrices(["blocks.1.mlp.c_fc", "blocks.1.mlp.c_proj"])
    assert layer == 1 and sites == {"blocks.1.mlp.c_fc": ("1.mlp.neuron", "1.mlp.in"),
                                    "blocks.1.mlp.c_proj": ("1.mlp.out", "1.mlp.neuron")}
    with pytest.raises(UserError, match="blocks.0.attn.c_attn"):
        mlp_matrices(["blocks.0.attn.c_attn"])
    with pytest.raises(UserError, match="several blocks"):
        mlp_matrices(["blocks.0.mlp.c_fc", "blocks.1.mlp.c_fc"])


def write_circuit(directory, ckpt, kept: dict) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "run.json").write_text(json.dumps({"config": {"checkpoint": str(ckpt), "n_test": 8, "seed": 0,
                                                                "mean_sequences": 4, "means_data": None}}))
    path = directory / "single_double_quote.json"
    path.write_text(json.dumps({"task": "single_double_quote", "circuit": {"kept": kept, "without": None},
                                "trusted": False, "why": ["hand-made for a test"], "checks": {}}))
    return str(path)


def test_the_command_compares_a_decomposition_with_a_circuit(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)  # the comparison caches site means beside the checkpoint
    ckpt = checkpoint.resolve(run)
    neurons = list(range(10))
    circuit = write_circuit(tmp_path / "circuits", ckpt, {"0.mlp.in": [0, 1, 2, 3, 4], "0.mlp.neuron": neurons, "0.mlp.out": [1, 2]})
    out = tmp_path / "dec"
    base = [sys.executable, "-m", "sparse_lm.decompose", "decompose=tiny_mlp", f"checkpoint={run}", "steps=3", "batch_size=2",
            "ctx=16", "C=8", "eval_interval=3", "ckpt_interval=3", f"out_dir={out}"]
    proc = subprocess.run([*base, f"circuit={circuit}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "versus-single_double_quote.json").read_text())
    assert (out / "versus-single_double_quote.png").stat().st_size > 5000
    ab = report["ablation"]
    # With every mask at 1 the subcomponents and the residual add up to the target exactly: the whole model's loss.
    assert ab["all subcomponents"]["loss"] == pytest.approx(ab["whole model"]["loss"], rel=1e-4)
    assert ab["random live ablated"]["draws"] == 20 and ab["random neurons ablated"]["draws"] == 20
    fc, proj = report["matrices"]["blocks.0.mlp.c_fc"], report["matrices"]["blocks.0.mlp.c_proj"]
    assert fc["share_entries"] == pytest.approx(10 * 5 / (128 * 32)) and proj["share_entries"] == pytest.approx(2 * 10 / (32 * 128))
    assert all(0 <= s <= 1 + 1e-6 for s in fc["circuit_share"] + proj["circuit_share"])
    assert fc["neuron_share_entries"] == proj["neuron_share_entries"] == pytest.approx(10 / 128)  # c_fc rows, c_proj columns
    assert fc["neuron_share_target"] >= fc["share_target"] - 1e-6  # the neurons' rows hold the circuit's entries and more
    assert report["circuit_neurons"] == 10 and report["neuron_site"] == "0.mlp.neuron"

    # Keeping every neuron of the MLP "alone" ablates nothing: the whole model again.
    every = write_circuit(tmp_path / "every", ckpt, {"0.mlp.neuron": list(range(128))})
    proc = subprocess.run([*base, f"circuit={every}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ab = json.loads((out / "versus-single_double_quote.json").read_text())["ablation"]
    assert ab["circuit neurons alone"]["loss"] == pytest.approx(ab["whole model"]["loss"], rel=1e-5)


def test_a_file_without_a_circuit_is_named_before_any_training(tiny_run, tmp_path):
    ckpt = checkpoint.resolve(tiny_run)
    empty = write_circuit(tmp_path / "circuits", ckpt, {})
    out = tmp_path / "dec"
    proc = subprocess.run([sys.executable, "-m", "sparse_lm.decompose", "decompose=tiny_mlp", f"checkpoint={tiny_run}",
                           "steps=3", f"out_dir={out}", f"circuit={empty}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "holds no circuit" in proc.stderr + proc.stdout and "single_double_quote" in proc.stderr + proc.stdout
    assert not (out / "decomposition.pt").exists()
