"""What each parameter and each activation site of the GPT is, defined once (docs/method.md §1–§2).

Every module that treats parameters differently (initialisation, sparsity, weight decay, FLOP counts) or names
activation sites (AbsTopK switches, hooks, circuit nodes, edges) asks this module; nothing here imports the rest
of the package.
"""

from __future__ import annotations

from dataclasses import dataclass

# The eight activation sites of a layer where AbsTopK can act and circuits have nodes, in forward order. Config
# fields (`model.topk_sites`) use these names; in a model the site `attn_q` of layer 3 is called "3.attn.q".
SITES = ("attn_in", "attn_q", "attn_k", "attn_v", "attn_out", "mlp_in", "mlp_neuron", "mlp_out")
RESIDUAL_READS = ("attn_in", "mlp_in")  # sites that read the residual stream (after a norm)
RESIDUAL_WRITES = ("attn_out", "mlp_out")  # sites that write to it
RESIDUAL = ("resid_pre", "resid_mid", "resid_post")  # the stream itself, named but never top-k'd


def site_name(layer: int, site: str) -> str:
    """The model's name of one site of `layer`: site_name(3, "attn_q") == "3.attn.q"."""
    return f"{layer}.{site}" if site in RESIDUAL else f"{layer}.{site.replace('_', '.', 1)}"


def site_kind(name: str) -> str:
    """The inverse, without the layer: site_kind("3.attn.q") == "attn_q"."""
    rest = name.split(".", 1)[1]
    return rest if rest in RESIDUAL else rest.replace(".", "_", 1)


# Weight matrices of a block, as nn.Linear ([out, in]), and the axis that indexes the neurons each one touches:
# 0 = each row is a neuron (c_fc, c_attn: MLP neurons, q/k/v channels), 1 = each column (the c_proj reading them).
HIDDEN = {"attn.c_attn.weight": 0, "attn.c_proj.weight": 1, "mlp.c_fc.weight": 0, "mlp.c_proj.weight": 1}
UNEMBEDDING = "lm_head.weight"
EMBEDDINGS = ("wte.weight", "wpe.weight", UNEMBEDDING)


@dataclass(frozen=True)
class Role:
    """kind: hidden | embed | bias | gain | sink | bigram."""

    kind: str
    neuron_axis: int | None = None  # hidden matrices: the axis whose slices keep >= j nonzeros

    @property
    def decays(self) -> bool:
        """Decoupled weight decay: every matrix but the bigram table (not biases, gains or sink logits)."""
        return self.kind in ("hidden", "embed")

    matmul: bool = False  # multiplies activations in the forward pass (the hidden matrices and the unembedding)

    def sparse(self, sparsify_biases: bool) -> bool:
        """Projected to a density: matrices and embeddings, biases by choice; never gains, sinks, the bigram table."""
        return self.kind in ("hidden", "embed") or (self.kind == "bias" and sparsify_biases)


def role(name: str) -> Role:
    """The role of a GPT parameter, from its name in `named_parameters()`."""
    axis = next((a for suffix, a in HIDDEN.items() if name.endswith(suffix)), None)
    if axis is not None:
        return Role("hidden", axis, matmul=True)
    if name in EMBEDDINGS:
        return Role("embed", matmul=name == UNEMBEDDING)
    if name.endswith(".bias"):
        return Role("bias")
    if name == "bigram":
        return Role("bigram")
    if name.endswith(".sink"):
        return Role("sink")
    if "norm" in name:
        return Role("gain")
    raise ValueError(f"parameter {name!r} has no role in sparse_lm.roles; add one")


def writes_mlp_hidden(name: str) -> bool:
    """The matrix whose output is the MLP's hidden layer, which only the same MLP's c_proj reads (after the
    activation function and its site): the stretch of the model that may be stored along tokens."""
    return name.endswith("mlp.c_fc.weight")


def writes_residual(name: str) -> bool:
    """The projections that add into the residual stream (GPT-2 scales their init down with depth)."""
    return name.endswith("c_proj.weight")


def nonzeros_by_kind(weights: dict) -> dict[str, tuple[int, int]]:
    """(nonzero, total) entries per kind of sparsifiable parameter (hidden, embed, bias) of a state dict."""
    out: dict[str, tuple[int, int]] = {}
    for name, w in weights.items():
        kind = role(name).kind
        if kind in ("hidden", "embed", "bias"):
            nz, n = out.get(kind, (0, 0))
            out[kind] = (nz + int(w.count_nonzero()), n + w.numel())
    return out
