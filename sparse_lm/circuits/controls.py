"""Controls of the faithfulness battery: models and tasks on which a search that measures something must fail.

- random_init: a freshly initialised model of the checkpoint's shape, projected to the checkpoint's densities;
- redrawn: the trained model's sparsity pattern with new values: every weight, embedding, bias and the bigram table
  keeps its nonzero positions, each filled with a seeded normal draw of the RMS of the trained nonzeros it replaces
  (norm gains and sink logits are kept): the same mask and scale, random weights;
- nonsense: the task's contexts with each pair's labels swapped on a seeded coin flip, so that the answer does not
  depend on the context: neither the whole model nor any circuit can reach the target on held-out pairs honestly.
"""

from __future__ import annotations

import torch

from sparse_lm.circuits.tasks import TaskData
from sparse_lm.model import GPT
from sparse_lm.roles import role
from sparse_lm.sparsity import Sparsifier


def random_init_model(mcfg, step: int, seed: int, device: str) -> GPT:
    """A random-init model of `mcfg`'s shape with the densities of `step` of its schedule."""
    torch.manual_seed(seed)
    model = GPT(mcfg.model).to(device)
    sparsifier = Sparsifier(model, mcfg.sparsity, mcfg.train.max_steps)
    sparsifier.apply(sparsifier.plan(step))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def redrawn_model(model: GPT, seed: int) -> GPT:
    """A copy of `model` with every nonzero of its weights redrawn from N(0, RMS of that parameter's nonzeros)."""
    g = torch.Generator().manual_seed(seed)
    copy = GPT(model.cfg).to(model.lm_head.weight.device)
    copy.load_state_dict(model.state_dict())
    for name, p in copy.named_parameters():
        if role(name).kind in ("gain", "sink"):
            continue
        flat = p.view(-1)
        where = flat.nonzero().flatten()
        if len(where):
            rms = flat[where].pow(2).mean().sqrt()
            flat[where] = (torch.randn(len(where), generator=g) * rms).to(flat)
    return copy.eval().requires_grad_(False)


def nonsense(data: TaskData, seed: int) -> TaskData:
    """`data` with the labels of a seeded half of its pairs swapped (the A side now wants b, the B side a)."""
    n = data.n_pairs
    flip = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
    first, second = torch.arange(n), torch.arange(n, 2 * n)
    order = torch.cat([torch.where(flip, second, first), torch.where(flip, first, second)])
    return TaskData(data.name, data.answers, data.answer_text, data.tokens[order], data.lengths[order])
