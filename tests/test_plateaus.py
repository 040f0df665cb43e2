"""Activation plateaus: paths, the covariance-matched sampler, the batched read-outs, and a model built by hand whose
output is a thresholded function of one residual direction, so the plateau and the sensitive direction are known."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from sparse_lm.config import ModelConfig
from sparse_lm.model import GPT, Site
from sparse_lm.plateaus.geometry import Stats, shrinkage_covariance, sphere, straight
from sparse_lm.plateaus.measure import activations, along
from sparse_lm.plateaus.protocol import summarize
from sparse_lm.plateaus.stats import bootstrap_mean, crossing, rank_test


def test_the_straight_path_ends_at_the_target_and_the_sphere_path_keeps_the_radius():
    g = torch.Generator().manual_seed(0)
    base, target, centre = (torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    fractions = torch.linspace(0, 1, 11, dtype=torch.float64)
    line = straight(base, target, fractions)
    assert torch.allclose(line[:, 0], base) and torch.allclose(line[:, -1], target)
    points, angles = sphere(base, target, centre, fractions)
    radius = (points - centre[:, None]).norm(dim=-1)
    assert torch.allclose(radius, (base - centre).norm(dim=-1, keepdim=True).expand_as(radius))
    assert torch.allclose(points[:, 0], base)
    end = points[:, -1] - centre  # the last point points the way the target does
    assert torch.allclose(torch.nn.functional.cosine_similarity(end, target - centre, dim=-1), torch.ones(5, dtype=torch.float64))
    cos = torch.nn.functional.cosine_similarity(base - centre, target - centre, dim=-1)
    assert torch.allclose(angles[:, -1], torch.rad2deg(torch.acos(cos))) and torch.all(angles[:, 0] == 0)


def test_the_shrinkage_estimate_matches_the_ledoit_wolf_definition_and_the_sampler_reproduces_it():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    cov, lam = shrinkage_covariance(x)
    n, d = x.shape
    xc = x - x.mean(0)
    s = xc.T @ xc / n
    mu = torch.trace(s) / d
    beta2 = sum(((xk[:, None] * xk[None, :] - s) ** 2).sum() for xk in xc) / (n * n * d)  # outer products, one by one
    delta2 = ((s - mu * torch.eye(d, dtype=x.dtype)) ** 2).sum() / d
    assert math.isclose(lam, min(float(beta2 / delta2), 1.0), rel_tol=1e-10)
    assert torch.allclose(cov, (1 - lam) * s + lam * mu * torch.eye(d, dtype=x.dtype))
    stats = Stats.of(x)
    draws = stats.sample(200_000, torch.Generator().manual_seed(2))
    scale = stats.cov.diagonal().sqrt()
    assert ((draws.mean(0) - stats.mean).abs() / scale).max() < 0.02  # 200k draws: standard error 0.0022 sd
    emp = torch.cov(draws.T)
    assert ((emp - stats.cov).abs() / (scale[:, None] * scale[None, :])).max() < 0.02


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=50, ctx_len=16, n_layer=2, d_model=32, d_mlp=64)).eval()


def test_kl_is_zero_at_the_start_and_only_the_last_position_of_the_site_changes():
    model = tiny_gpt()
    tokens = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(0))
    real = activations(model, "1.resid_pre", tokens)
    target = real.roll(1, 0)
    points = straight(real, target, torch.linspace(0, 1, 5, dtype=torch.float64))
    curves = along(model, "1.resid_pre", "1.resid_post", tokens, points, rows_per_pass=4)
    assert curves.kl.shape == (3, 5) and torch.all(curves.kl[:, 0].abs() < 1e-12) and torch.all(curves.l2[:, 0] < 1e-6)
    assert torch.all(curves.kl[:, -1] > 0)
    # the patch touches the last position of that site only: earlier positions and the clean run are unchanged
    from sparse_lm.hooks import patch, record

    def put(x):
        x = x.clone()
        x[:, -1] = 5.0
        return x

    with torch.no_grad():
        clean = model(tokens)[0]
        with patch(model, {"1.resid_pre": put}), record(model, ["1.resid_pre"]) as acts:
            moved = model(tokens)[0]
    assert torch.equal(moved[:, :-1], clean[:, :-1]) and not torch.equal(moved[:, -1], clean[:, -1])
    assert torch.all(acts["1.resid_pre"][:, -1] == 5.0)


class Threshold(nn.Module):
    """Embedding → site "0.resid" → logits [0, 12·σ(40·(v·x − 1))]: the output changes only when the residual's
    component along v = e_1 passes 1. Real activations vary mostly along e_0 and sit near v·x = 0."""

    def __init__(self, n_tokens=64, d=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        emb = torch.randn(n_tokens, d, generator=g) * 0.05
        emb[:, 0] = torch.randn(n_tokens, generator=g) * 3.0  # the data's own direction: large variance
        emb[:, 1] = torch.randn(n_tokens, generator=g) * 0.1  # the sensitive direction: small variance, threshold at 1
        self.emb = nn.Embedding.from_pretrained(emb)
        self.resid = Site("resid_pre", d)
        self.resid.name = "0.resid"
        self.late = Site("resid_post", 2)
        self.late.name = "0.late"
        self.sites = {"0.resid": self.resid, "0.late": self.late}

    def site(self, name):
        return self.sites[name]

    def forward(self, idx):
        x = self.resid(self.emb(idx))
        on = torch.sigmoid(40 * (x[..., 1] - 1.0))
        logits = self.late(torch.stack([torch.zeros_like(on), 12 * on], dim=-1))
        return logits, None


def test_the_hand_built_plateau_and_sensitive_direction_are_found_where_they_are_built():
    model = Threshold()
    tokens = torch.arange(64).view(64, 1)
    real = activations(model, "0.resid", tokens)
    alphas = torch.linspace(0, 1, 201, dtype=torch.float64)
    # toward a point 3 units along the sensitive direction: KL crosses where v·x passes 1 (± the sigmoid's width)
    target = real.clone()
    target[:, 1] += 3.0
    curves = along(model, "0.resid", "0.late", tokens, straight(real, target, alphas))
    for i in range(64):
        at = crossing(alphas, curves.kl[i], 0.5)
        built = (1.0 - float(real[i, 1])) / 3.0
        assert at is not None and abs(at - built) < 0.03, (i, at, built)
    # along the data's own direction, as far: a plateau (no change at all)
    flat = real.clone()
    flat[:, 0] += 3.0
    assert curves_max(model, tokens, real, flat, alphas) < 1e-6
    # covariance-matched targets stay on the plateau far more often than isotropic ones at the same distance
    # (isotropic: about 1/√8 of a radius of ~3 falls on v, enough to pass the threshold about one time in ten)
    stats = Stats.of(real)
    g = torch.Generator().manual_seed(0)
    matched = stats.sample(512, g)
    iso = stats.isotropic(512, (matched - stats.mean).norm(dim=1), g)
    bases, prompts = real.repeat(8, 1), tokens.repeat(8, 1)
    frac = [float((along(model, "0.resid", "0.late", prompts, straight(bases, t, alphas[::20])).kl[:, -1] > 0.5).double().mean())
            for t in (matched, iso)]
    assert frac[0] < 0.01 and frac[1] > 0.05, frac  # 512 draws each: the gap is many binomial standard errors


def curves_max(model, tokens, base, target, alphas) -> float:
    return float(along(model, "0.resid", "0.late", tokens, straight(base, target, alphas)).kl.max())


def test_crossings_intervals_and_the_rank_test_on_hand_values():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert crossing(x, torch.tensor([0.0, 0.2, 0.6, 1.0]), 0.5) == pytest.approx(1.75)
    assert crossing(x, torch.tensor([0.0, 0.1, 0.2, 0.3]), 0.5) is None and crossing(x, torch.tensor([0.9, 1, 1, 1.0]), 0.5) == 0.0
    mean, lo, hi = bootstrap_mean([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and 1.0 <= lo < 2.5 < hi <= 4.0
    p_greater, p = rank_test([5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 5, 6, 7, 8])
    assert p_greater == pytest.approx(56 / 64)  # 4.5 + 5.5 + 6.5 + 7.5 + 4 · 8 of 64 pairs
    # U = 56 against 32, variance 64/12 · (17 − 4·6/240) with four tied pairs: z = 2.528
    assert p == pytest.approx(math.erfc(24 / math.sqrt(64 / 12 * (17 - 24 / 240)) / math.sqrt(2)), rel=1e-9)
    assert rank_test([1, 2, 3], [1, 2, 3]) == (0.5, 1.0)
    # a summary's picture grid on the straight path (one x row shared by every curve) is that row
    fractions = torch.linspace(0, 1, 5, dtype=torch.float64)
    s = summarize("real", "real_other", "straight", fractions.expand(3, -1), torch.rand(3, 5), [0.5], 10, 0)
    assert s.curve_x == fractions.tolist()


def test_the_command_runs_a_model_and_its_random_init_copy_and_writes_its_report(tiny_run, tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "plateaus"
    cmd = [sys.executable, "-m", "sparse_lm.plateaus", str(tiny_run), f"compare=[{tiny_run}]", f"out_dir={out}", "n_prompts=12",
           "n_bases=4", "steps=5", "bootstrap=50", "ctx=8"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "plateaus.json").read_text())
    labels = [m["label"] for m in report["models"]]
    assert labels[1].endswith("random-init") and len(labels) == 4 and report["same_prompts"] is True
    first = report["models"][0]
    assert first["site"] == "1.resid_pre" and first["readout"] == "1.resid_post"
    assert {(s["base"], s["direction"], s["path"]) for s in first["summaries"]} == {
        (b, d, p) for b in ("real", "random") for d in ("real_other", "cov_random", "isotropic", "mix_real", "mix_cov")
        for p in ("straight", "sphere")}
    assert all(len(s["thresholds"]["0.5"]) == 4 for s in first["summaries"])
    assert report["differences"][0]["model"] == labels[2]  # the same run compared with itself
    rows = (out / "plateaus.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 20 * 4  # header, then 4 models × 20 curve sets × 4 curves
    assert (out / "curves.png").stat().st_size > 20_000 and "difference of differences" in (out / "summary.txt").read_text()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "already holds results" in again.stderr
