"""Toy models whose mechanisms are known, the targets on which a decomposition is first proved (docs/decompose.md).

- `TMS`: a toy model of superposition (Elhage et al. 2022): n sparse features squeezed into m < n hidden dimensions
  and read back through a ReLU, `relu(W₂ (H) W₁ x + b)`, with W₂ = W₁ᵀ when tied and H an optional frozen identity.
  Each feature is one column of W₁: the ground-truth mechanism is one rank-one piece per feature and matrix.
- `ResidualMLP`: "compressed computation" (Braun et al. 2025): n features embedded in a wide residual stream by a
  fixed random W_E, MLP layers with fewer neurons than features, read out by W_Eᵀ; trained to output x + relu(x), so
  the MLPs compute n ReLUs with fewer neurons. Only the MLP matrices are decomposed (the embedding is fixed).

The inputs (`sparse_features`) are the published ones: each feature is active with probability p, with a value
drawn uniformly from `value_range`.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from sparse_lm.config import Toy, ToyConfig
from sparse_lm.errors import UserError


def sparse_features(batch: int, n: int, p: float, value_range=(0.0, 1.0), generator=None, device="cpu") -> torch.Tensor:
    """[batch, n]: each entry active with probability p, at a value uniform in value_range; 0 otherwise."""
    lo, hi = value_range
    on = torch.rand(batch, n, generator=generator, device=device) < p
    values = torch.rand(batch, n, generator=generator, device=device) * (hi - lo) + lo
    return values * on


class TMS(nn.Module):
    def __init__(self, n_features: int, n_hidden: int, tied: bool = True, hidden_identity: bool = False):
        super().__init__()
        self.n_features, self.n_hidden, self.tied = n_features, n_hidden, tied
        self.linear1 = nn.Linear(n_features, n_hidden, bias=False)
        # A frozen identity between the two, so a decomposition has a matrix it should leave as one piece.
        self.hidden = nn.Linear(n_hidden, n_hidden, bias=False) if hidden_identity else None
        self.linear2 = nn.Linear(n_hidden, n_features, bias=True)
        with torch.no_grad():
            nn.init.xavier_normal_(self.linear1.weight)
            self.linear2.bias.zero_()
            if self.hidden is not None:
                self.hidden.weight.copy_(torch.eye(n_hidden))
                self.hidden.weight.requires_grad_(False)
        self.tie_()

    @torch.no_grad()
    def tie_(self) -> None:
        """W₂ = W₁ᵀ (called after every optimiser step when tied: the pair is one parameter)."""
        if self.tied:
            self.linear2.weight.copy_(self.linear1.weight.T)

    def tie_grads_(self) -> None:
        """The gradient of the shared parameter is the sum of both uses'."""
        if self.tied and self.linear2.weight.grad is not None:
            self.linear1.weight.grad += self.linear2.weight.grad.T
            self.linear2.weight.grad = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear1(x)
        if self.hidden is not None:
            h = self.hidden(h)
        return F.relu(self.linear2(h))

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def ground_truth(self) -> dict[str, torch.Tensor]:
        """Per decomposed matrix, the known rank-one pieces [n_features, d_out, d_in]: feature i's column of W₁
        (e_i in, W₁[:, i] out) and its row of W₂."""
        eye = torch.eye(self.n_features)
        w1, w2 = self.linear1.weight.detach(), self.linear2.weight.detach()
        return {"linear1": torch.einsum("oi,fi->foi", w1, eye), "linear2": torch.einsum("oi,fo->foi", w2, eye)}


class ResidualMLP(nn.Module):
    def __init__(self, n_features: int = 100, d_embed: int = 1000, d_mlp: int = 50, n_layers: int = 1, seed: int = 0):
        super().__init__()
        self.n_features, self.n_layers = n_features, n_layers
        g = torch.Generator().manual_seed(seed)
        w_e = torch.randn(n_features, d_embed, generator=g)
        self.register_buffer("W_E", w_e / w_e.norm(dim=1, keepdim=True))  # fixed unit-norm embedding
        self.layers = nn.ModuleList()
        for _ in range(n_layers):
            mlp = nn.Module()
            mlp.mlp_in = nn.Linear(d_embed, d_mlp, bias=True)
            mlp.mlp_out = nn.Linear(d_mlp, d_embed, bias=False)
            with torch.no_grad():
                nn.init.normal_(mlp.mlp_in.weight, std=1 / math.sqrt(d_embed))
                nn.init.normal_(mlp.mlp_out.weight, std=1 / math.sqrt(d_mlp * n_layers))
                mlp.mlp_in.bias.zero_()
            self.layers.append(mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        resid = x @ self.W_E
        for mlp in self.layers:
            resid = resid + mlp.mlp_out(F.relu(mlp.mlp_in(resid)))
        return resid @ self.W_E.T

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(x)

    def tie_(self) -> None:
        pass

    def tie_grads_(self) -> None:
        pass


def build_toy(spec: ToyConfig) -> nn.Module:
    if len(spec.value_range) != 2 or not spec.value_range[0] < spec.value_range[1]:
        raise UserError(f"toy.value_range={list(spec.value_range)} must be [lo, hi] with lo < hi")
    torch.manual_seed(spec.seed)
    if spec.kind == Toy.tms:
        return TMS(spec.n_features, spec.n_hidden, spec.tied, spec.hidden_identity)
    return ResidualMLP(spec.n_features, spec.d_embed, spec.d_mlp, spec.n_layers, spec.seed)


def train_toy(model: nn.Module, spec: ToyConfig, log=None) -> list[float]:
    """Train a toy on its own task (MSE to its labels), AdamW at a constant rate as published; returns the losses."""
    g = torch.Generator().manual_seed(spec.seed)
    params = [p for n, p in model.named_parameters() if p.requires_grad and not (getattr(model, "tied", False) and n == "linear2.weight")]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    losses = []
    for step in range(spec.steps):
        x = sparse_features(spec.batch_size, spec.n_features, spec.feature_probability, tuple(spec.value_range), g)
        loss = F.mse_loss(model(x), model.labels(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        model.tie_grads_()
        opt.step()
        model.tie_()
        losses.append(loss.item())
        if log and (step % max(1, spec.steps // 10) == 0 or step == spec.steps - 1):
            log(f"toy step {step + 1}/{spec.steps} | loss {loss.item():.3e}")
    return losses
