"""The kernels wired into a model from outside (sparse_lm/backends.py) compute what the reference computes."""

import copy
import dataclasses
import os

import pytest
import torch

from sparse_lm.backends import install
from sparse_lm.config import Backend, KernelsConfig, ModelConfig, OpImpl, SparsityConfig
from sparse_lm.metrics import read_metrics
from sparse_lm.model import GPT
from sparse_lm.sparsity import Sparsifier
from tests.conftest import DEVICE, run_train

ALL_TRITON = KernelsConfig(backend=Backend.triton, abstopk=OpImpl.triton, select=OpImpl.triton)


def model_and_sparsifier(seed=0):
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=64, ctx_len=12, n_layer=2, d_model=32, d_mlp=64)).to(DEVICE)
    return model, Sparsifier(model, SparsityConfig(hidden_density=0.25, embed_density=0.5), total_steps=10)


@pytest.mark.parametrize("mlp_feature_major", [False, True])
def test_installed_kernels_give_the_reference_logits_and_gradients(mlp_feature_major):
    ref_model, ref_sp = model_and_sparsifier()
    model = copy.deepcopy(ref_model)
    sp = Sparsifier(model, ref_sp.cfg, total_steps=10)
    keys = list(model.state_dict())
    accel = install(model, sp, dataclasses.replace(ALL_TRITON, mlp_feature_major=mlp_feature_major), torch.float32)
    hidden = []  # what the MLP's c_proj reads (after GELU and the fused AbsTopK), and the gradient coming back to it

    def keep(module, inputs, out):
        hidden.append(out)
        out.register_hook(hidden.append)

    model.site("0.mlp.neuron").register_forward_hook(keep)
    assert list(model.state_dict()) == keys  # same parameter names: checkpoints are interchangeable
    ref_sp.apply(ref_sp.plan(10))
    sp.apply(sp.plan(10))  # radix select: the same survivors
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()))
    accel.after_step(sp.plan(10))
    assert set(accel.modes().values()) == {"triton"} and len(accel.modes()) == 8
    idx = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    logits, loss = model(idx, idx)
    ref_logits, ref_loss = ref_model(idx, idx)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    loss.backward()
    ref_loss.backward()
    for (name, p), ref in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-4, atol=1e-6, msg=name)
    out, grad = hidden
    tokens = 3 * 12
    stored_along_tokens = [t.reshape(tokens, -1).stride() == (1, tokens) for t in (out, grad)]
    assert stored_along_tokens == [mlp_feature_major] * 2, stored_along_tokens  # forwards and backwards, no copy


def test_layer_modes_follow_the_schedule_and_the_crossover():
    model, sp = model_and_sparsifier()
    accel = install(model, sp, KernelsConfig(backend=Backend.auto, crossover=0.3), torch.float32)
    accel.after_step(sp.plan(0))
    assert set(accel.modes().values()) == {"dense"}  # dense phase
    assert accel.on_gpu == (DEVICE == "cuda")
    accel.on_gpu = False
    accel.after_step(sp.plan(10))
    assert set(accel.modes().values()) == {"dense"}  # auto never leaves dense on the CPU
    accel.on_gpu = True
    assert [accel.mode(p, sp.plan(s)) for p, _ in accel.layers[:1] for s in (0, 3, 10)] == ["dense", "dense", "triton"]
    accel.crossovers[tuple(accel.layers[0][0].param.shape)] = 0.1  # a calibrated crossover below this density
    assert accel.mode(accel.layers[0][0], sp.plan(10)) == "dense"
    model, sp = model_and_sparsifier()
    accel = install(model, sp, KernelsConfig(backend=Backend.torch_sparse), torch.float32)
    accel.after_step(sp.plan(10))
    assert set(accel.modes().values()) == {"torch_sparse"}


def test_triton_settings_on_a_cpu_without_the_interpreter_fail_before_any_work(corpus, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = run_train(tmp_path / "cpu", corpus, "kernels.abstopk=triton", "train.device=cpu", check=False, env=env)
    assert proc.returncode != 0 and "kernels.abstopk=triton needs a CUDA device" in proc.stderr


def test_training_with_every_kernel_matches_the_reference_run(corpus, tmp_path):
    """Two steps (the second at the final density, through the SpMM, fused AbsTopK and radix select, with the MLP's
    hidden activations stored along tokens)."""
    common = ["train.max_steps=2", "train.batch_size=4", "train.eval_sequences=4", "train.ckpt_interval=2", "model.ctx_len=32"]
    run_train(tmp_path / "reference", corpus, *common)
    run_train(tmp_path / "triton", corpus, *common, "kernels.backend=triton", "kernels.abstopk=triton", "kernels.select=triton",
              "kernels.mlp_feature_major=true")
    ref, fast = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("reference", "triton"))
    assert [r["step"] for r in fast] == [r["step"] for r in ref] == [1, 2, 2]
    for a, b in zip(ref, fast):
        for key in ("loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-4), (a, b)


def test_refreshing_the_compressed_copies_does_not_recompile_a_compiled_model():
    import torch._dynamo

    model, sp = model_and_sparsifier()
    # Every kernel, the MLP interior stored along tokens: the fake implementations must give the real layouts.
    accel = install(model, sp, dataclasses.replace(ALL_TRITON, mlp_feature_major=True), torch.float32)
    compiled = torch.compile(model, backend="aot_eager")
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    sp.apply(sp.plan(8))
    accel.after_step(sp.plan(8))
    compiled(idx, idx)[1].backward()
    before = [id(layer.fwd.vals) for _, layer in accel.layers]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in (9, 10):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
            sp.apply(sp.plan(step))
            accel.after_step(sp.plan(step))
            logits, loss = compiled(idx, idx)
            loss.backward()
            torch.testing.assert_close(logits, model(idx)[0], rtol=1e-5, atol=1e-5)
    assert [id(layer.fwd.vals) for _, layer in accel.layers] == before
