"""Apply the Triton kernels (kernels/) to a model and its Sparsifier from outside, per `kernels.*` settings.

    accel = install(model, sparsifier, cfg.kernels, compute_dtype)   # before the optimizer sees the model
    ...
    accel.after_step(plan)   # after every projection + weight decay: pick each layer's mode, rebuild copies

- backend: each hidden linear layer becomes a kernels.linear.SparseLinear (same Parameters). Its mode at a step
  is `dense` while the matrix is dense or (for `auto`) above the crossover density, else the SpMM backend.
  The density comes from the step's sparsity plan, so the choice needs no host sync.
  With mlp_feature_major, each MLP's sparse c_fc writes its output stored along tokens, for c_proj's SpMM.
- abstopk=triton: every activation Site uses the fused kernel.
- select=triton: the Sparsifier's projection uses the radix select (warm-started per matrix).
"""

from __future__ import annotations

import json
import logging

import torch
import torch.nn as nn

from sparse_lm.config import Backend, KernelsConfig, OpImpl
from sparse_lm.fsutil import write_json
from sparse_lm.roles import writes_mlp_hidden
from sparse_lm.sparsity import Plan, Sparsifier, SparseParam

log = logging.getLogger("sparse_lm")


class Accelerator:
    def __init__(self, layers: list, cfg: KernelsConfig, dtype: torch.dtype, crossovers: dict):
        self.layers: list[tuple[SparseParam, nn.Module]] = layers
        self.cfg, self.dtype, self.crossovers = cfg, dtype, crossovers
        self.on_gpu = any(sp.param.is_cuda for sp, _ in layers)  # `auto` stays dense on the CPU

    def mode(self, sp: SparseParam, plan: Plan) -> str:
        density = plan.density[sp.kind]
        backend = self.cfg.backend
        if density >= 1.0 or backend == Backend.dense:
            return "dense"
        if backend == Backend.auto:
            crossover = self.crossovers.get(tuple(sp.param.shape), self.cfg.crossover)
            return "triton" if self.on_gpu and density <= crossover else "dense"
        return backend.value

    def after_step(self, plan: Plan) -> None:
        for sp, layer in self.layers:
            layer.refresh(self.mode(sp, plan), plan.k[sp.name], self.dtype)

    def modes(self) -> dict[str, str]:
        return {sp.name: layer.mode for sp, layer in self.layers}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)


def install(model: nn.Module, sparsifier: Sparsifier, cfg: KernelsConfig, dtype: torch.dtype, tokens: int = 0) -> Accelerator:
    """Wire the chosen kernels into `model` and `sparsifier`; `tokens` (per forward) is used for calibration."""
    if cfg.abstopk == OpImpl.triton:
        from kernels.abstopk import abstopk

        for site in model.sites.values():
            site.topk_fn = abstopk
    if cfg.select == OpImpl.triton:
        from kernels.select import RadixSelect

        select = RadixSelect()  # warm-started per parameter; the same survivors as projection_mask
        sparsifier.mask_fn = lambda sp, k, j: select(sp.name, sp.param, k, j, sp.neuron_axis)
    if cfg.mlp_feature_major and cfg.backend == Backend.dense:
        log.warning("kernels.mlp_feature_major=true does nothing with kernels.backend=dense (only a sparse c_fc writes that layout)")
    layers = []
    if cfg.backend != Backend.dense:
        from kernels.linear import SparseLinear

        for sp in sparsifier.params:
            if sp.kind == "hidden":
                module_name = sp.name.removesuffix(".weight")
                layer = SparseLinear(model.get_submodule(module_name))
                layer.feature_major_out = cfg.mlp_feature_major and writes_mlp_hidden(sp.name)
                _replace(model, module_name, layer)
                layers.append((sp, layer))
    crossovers = {}
    if cfg.backend == Backend.auto and cfg.calibrate and torch.cuda.is_available() and layers:
        shapes = sorted({tuple(sp.param.shape) for sp, _ in layers})
        crossovers = calibrated_crossovers(shapes, tokens, dtype)
    return Accelerator(layers, cfg, dtype, crossovers)


def calibrated_crossovers(shapes: list[tuple[int, int]], tokens: int, dtype: torch.dtype) -> dict:
    """Per shape, the largest density at which the Triton layer step beats the dense one (cached on disk)."""
    from kernels.crossover import crossover_density
    from sparse_lm.data.cache import default_cache_dir

    path = default_cache_dir() / "crossover.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    device = torch.cuda.get_device_name()
    out = {}
    for shape in shapes:
        key = f"{device}|{shape[0]}x{shape[1]}|{tokens}|{dtype}"
        if key not in cache:
            cache[key] = crossover_density(shape, tokens, dtype)
            log.info(f"kernels: crossover for {shape[0]}x{shape[1]} at {tokens} tokens on {device}: {cache[key]:.3g}")
        out[shape] = cache[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, cache)
    return out
