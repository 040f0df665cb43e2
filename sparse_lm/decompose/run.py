"""`python -m sparse_lm.decompose`: decompose a toy or a trained model's matrices, report and plot.

    run(cfg) → target (a toy, trained first and kept in out_dir/toy.pt; or a checkpoint) → SPD or APD → fit
             (resumable: out_dir/decomposition.pt) → decomposition.json, curves.png, components.png, importance.png

For a toy the report holds the ground-truth metrics (mean max cosine similarity, L2 ratio), the causal importances
on one-hot inputs and the live subcomponents; for a language model, the live subcomponents and the losses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from sparse_lm import checkpoint
from sparse_lm.cli import load_model
from sparse_lm.config import DecomposeConfig, Init, Method
from sparse_lm.decompose import circuit as versus
from sparse_lm.decompose import metrics
from sparse_lm.decompose.apd import APD
from sparse_lm.decompose.fit import Plan, fit
from sparse_lm.decompose.spd import SPD, key
from sparse_lm.decompose.toys import TMS, build_toy, sparse_features, train_toy
from sparse_lm.errors import UserError
from sparse_lm.fsutil import atomic_file, write_json


def output_dir(cfg: DecomposeConfig) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir)
    if cfg.checkpoint:
        return checkpoint.results_dir(checkpoint.resolve(cfg.checkpoint), "decompose")
    return Path("runs") / f"decompose-{cfg.name}"


class Target:
    """What is decomposed and how it is fed: model, batch sampler, output function and loss, ground truth."""

    def __init__(self, model, batch, output, output_kind: str, truth=None, n_features: int | None = None, loaded=None):
        self.model, self.batch, self.output, self.output_kind = model, batch, output, output_kind
        self.truth, self.n_features = truth, n_features
        self.loaded = loaded  # a checkpoint's (path, tokenizer, config, state)


def toy_target(cfg: DecomposeConfig, out: Path, log) -> Target:
    spec = cfg.toy
    model = build_toy(spec)
    path, spec_yaml = out / "toy.pt", OmegaConf.to_yaml(OmegaConf.structured(spec))
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["spec"] != spec_yaml:
            raise UserError(f"{path} holds a toy trained with other settings; use another out_dir or overwrite=true")
        model.load_state_dict(state["model"])
        log(f"toy: reused {path} (loss {state['loss']:.3e})")
    else:
        losses = train_toy(model, spec, log)
        with atomic_file(path) as tmp:
            torch.save({"model": model.state_dict(), "spec": spec_yaml, "loss": losses[-1]}, tmp)
        log(f"toy: trained {spec.steps} steps, loss {losses[-1]:.3e}, kept in {path}")
    model.requires_grad_(False)

    def batch(g):
        return sparse_features(cfg.batch_size, spec.n_features, spec.feature_probability, tuple(spec.value_range), g)

    truth = model.ground_truth() if isinstance(model, TMS) else None
    return Target(model, batch, lambda m, x: m(x), "mse", truth, spec.n_features)


def model_target(cfg: DecomposeConfig, log) -> Target:
    from sparse_lm.data.cache import prepare

    ckpt = checkpoint.resolve(cfg.checkpoint)
    model, tok, mcfg, state = load_model(ckpt, cfg.device)
    data = prepare(mcfg.data, tok if "converted_from" in state else None)
    train = np.asarray(data.train)
    log(f"target {ckpt} ({mcfg.model.n_layer} layers, d_model {mcfg.model.d_model}); data {data.dir}")

    def batch(g):
        starts = torch.randint(0, len(train) - cfg.ctx, (cfg.batch_size,), generator=g).numpy()
        return torch.from_numpy(np.stack([train[s : s + cfg.ctx] for s in starts]).astype(np.int64))

    return Target(model, batch, lambda m, x: m(x)[0], "kl", loaded=(ckpt, tok, mcfg, state))


def build(cfg: DecomposeConfig, t: Target):
    if cfg.method == Method.spd:
        return SPD(t.model, cfg.modules, cfg.C, cfg.ci_hidden, cfg.pattern, t.output, cfg.delta_component)
    if cfg.pattern:
        raise UserError("pattern=true is implemented for method=spd only")
    return APD(t.model, cfg.modules, cfg.C, cfg.m, t.output)


def coefficients(cfg: DecomposeConfig) -> dict[str, float]:
    """Loss name → coefficient for the fit (docs/decompose.md); faithfulness=null resolves to the published choice."""
    spd = cfg.method == Method.spd
    faithfulness = cfg.faithfulness if cfg.faithfulness is not None else (0.0 if spd and cfg.delta_component else 1.0)
    if spd:
        return {"faithfulness": faithfulness, "stochastic_recon": cfg.stochastic_recon,
                "stochastic_recon_layerwise": cfg.stochastic_recon_layerwise, "importance_minimality": cfg.importance_minimality}
    return {"faithfulness": faithfulness, "minimality": cfg.minimality, "simplicity": cfg.simplicity}


@torch.no_grad()
def set_ground_truth(dec, truth: dict[str, torch.Tensor]) -> None:
    """Start at the toy's known pieces: piece f of every matrix is subcomponent (SPD) or component (APD) f."""
    for name, pieces in truth.items():
        if name not in dec.names:
            continue
        if pieces.shape[0] > dec.C:
            raise UserError(f"init=ground_truth: C={dec.C} is fewer than the {pieces.shape[0]} known pieces")
        u, s, vh = torch.linalg.svd(pieces)  # each piece is rank one
        U, V = u[:, :, 0] * s[:, :1], vh[:, 0, :]  # [F, d_out], [F, d_in]
        F = len(U)
        if isinstance(dec, SPD):
            c = dec.comp(name)
            c.U.zero_()
            c.U[:F] = U
            c.V.copy_(torch.randn_like(c.V) / c.V.shape[0] ** 0.5)
            c.V[:, :F] = V.T
        else:
            A, B = dec.A[key(name)], dec.B[key(name)]
            A.zero_()
            B.zero_()
            A[:F, :, 0] = V
            B[:F, 0, :] = U


def evaluate(cfg: DecomposeConfig, dec, t: Target, g_eval: torch.Generator) -> dict:
    out: dict = {}
    with torch.no_grad():
        x = t.batch(g_eval)
        if isinstance(dec, SPD):
            _, inputs = dec.run_target(x)
            gm, _ = dec.importances(inputs)
            for n in dec.names:
                out[f"{n}/live"] = metrics.live(gm[n])
                out[f"{n}/l0"] = float((gm[n] > 0).float().sum(-1).mean())
    for n in dec.names:
        if t.truth is not None and n in t.truth:
            w = dec.component_weights(n).detach()
            out[f"{n}/mmcs"], out[f"{n}/l2_ratio"] = metrics.mmcs_l2r(w, t.truth[n])
            out[f"{n}/mmcs_support"], out[f"{n}/l2_ratio_support"] = metrics.mmcs_l2r_support(w, t.truth[n])
    if t.n_features and isinstance(dec, SPD):
        ci = metrics.one_hot_importance(dec, t.n_features)
        for n in dec.names:
            s = metrics.identity_stats(ci[n])
            out[f"{n}/features_with_one"] = s["features_with_one"]
            out[f"{n}/features_with_any"] = int((ci[n] > 0.5).any(1).sum())
            out[f"{n}/identity_error"] = s["identity_error"]
    if t.n_features and isinstance(dec, APD):
        with torch.no_grad():
            x = torch.eye(t.n_features) * 0.75
            attr = dec.attributions_jvp(x)
        top = attr.argmax(-1)
        out["distinct_top_components"] = int(top.unique().numel())
    return out


def run(cfg: DecomposeConfig, log=print) -> dict:
    if (cfg.toy is None) == (cfg.checkpoint is None):
        raise UserError("give exactly one of toy (a preset: decompose=tms_40_10) or checkpoint=<run dir>")
    if cfg.circuit is not None:  # checked before any training
        if cfg.checkpoint is None or cfg.method != Method.spd:
            raise UserError("circuit= compares an SPD decomposition of a trained checkpoint with a circuit: give checkpoint= "
                            "and keep method=spd")
        versus.mlp_matrices(cfg.modules)
        versus.read_circuit(cfg.circuit, checkpoint.resolve(cfg.checkpoint))
    out = output_dir(cfg)
    state_path = out / "decomposition.pt"
    if cfg.overwrite and out.exists():
        for f in ("decomposition.pt", "toy.pt"):
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    t = toy_target(cfg, out, log) if cfg.toy is not None else model_target(cfg, log)
    dec = build(cfg, t)
    if cfg.init == Init.ground_truth:
        if t.truth is None:
            raise UserError("init=ground_truth needs a toy with a known mechanism (toy.kind=tms)")
        set_ground_truth(dec, t.truth)
    g, g_eval = torch.Generator().manual_seed(cfg.seed), torch.Generator().manual_seed(cfg.seed + 10_000)
    coeffs = coefficients(cfg)
    if isinstance(dec, SPD):
        def losses(step):
            return dec.losses(t.batch(g), p=cfg.p, output_kind=t.output_kind, n_mask_samples=cfg.n_mask_samples, generator=g)
        warm = [p for n, p in dec.named_parameters() if n.startswith("components.")]
    else:
        def losses(step):
            return dec.losses(t.batch(g), cfg.topk, cfg.schatten_p, t.output_kind)[0]
        warm = list(dec.parameters())
    warmup = cfg.warmup_steps if cfg.init == Init.random else 0
    plan = Plan(cfg.steps, cfg.lr, coeffs, warmup, cfg.warmup_lr, cfg.eval_interval, cfg.ckpt_interval)
    log(f"{cfg.method.value} on {', '.join(cfg.modules)}: C={cfg.C}, {cfg.steps} steps of {cfg.batch_size}, init {cfg.init.value} -> {out}")
    # what a resumed run must share with the one that wrote the checkpoint (the length and the intervals may change)
    same = {k: v for k, v in OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True).items()
            if k not in ("steps", "eval_interval", "ckpt_interval", "out_dir", "overwrite", "device", "name", "circuit")}
    history = fit(dec, losses, plan, state_path, g, lambda: evaluate(cfg, dec, t, g_eval), log, warm, settings=repr(same))
    result = {"config": OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True), "final": history[-1] if history else {},
              "history": history}
    write_json(out / "decomposition.json", result)
    from sparse_lm.decompose import plot

    plot.draw_all(dec, t, history, out)
    log(f"wrote {out}/decomposition.json, curves.png" + (", components.png, importance.png" if t.n_features else ""))
    if cfg.circuit is not None:
        ckpt, tok, mcfg, state = t.loaded
        report = versus.compare(dec, t.model, tok, mcfg, state, ckpt, cfg.circuit, cfg.seed, log)
        stem = out / f"versus-{report['task']}"
        write_json(stem.with_suffix(".json"), report)
        plot.versus_circuit(report, stem.with_suffix(".png"))
        log(f"wrote {stem}.json, {stem.name}.png")
        result["versus"] = report
    return result
