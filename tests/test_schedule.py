import math

import pytest

from sparse_lm.config import Anneal, SparsityConfig
from sparse_lm.schedule import density_at, lr_multiplier
from sparse_lm.sparsity import Sparsifier
from tests.test_sparsity import small_model

# docs/method.md §2: multiplier of the base lr, anneal 1% → 50% to density 1/64, linear in density, warm-up 1%.
REFERENCE_TABLE = {0: 0, 0.01: 0.125, 0.1: 0.126, 0.3: 0.137, 0.4: 0.163, 0.45: 0.204, 0.5: 0.505, 0.6: 0.404, 0.8: 0.202, 1.0: 0}


@pytest.mark.parametrize("t, expected", REFERENCE_TABLE.items())
def test_sharkfin_matches_spec_table(t, expected):
    density = density_at(t, 1 / 64, 0.01, 0.5)
    assert lr_multiplier(t, 0.01, density, 1 / 64) == pytest.approx(expected, abs=6e-4)


def test_density_endpoints_and_shapes():
    for anneal in Anneal:
        assert density_at(0.0, 0.1, 0.01, 0.5, anneal) == 1.0
        assert density_at(0.01, 0.1, 0.01, 0.5, anneal) == 1.0
        assert density_at(0.5, 0.1, 0.01, 0.5, anneal) == pytest.approx(0.1)
        assert density_at(0.9, 0.1, 0.01, 0.5, anneal) == pytest.approx(0.1)
    mid = (0.01 + 0.5) / 2
    assert density_at(mid, 0.1, 0.01, 0.5, Anneal.linear) == pytest.approx(0.55)
    assert density_at(mid, 0.1, 0.01, 0.5, Anneal.exp) == pytest.approx(math.sqrt(0.1))  # geometric midpoint


def test_lr_multiplier_never_exceeds_one_and_peaks_at_anneal_end():
    ts = [i / 1000 for i in range(1001)]
    m = [lr_multiplier(t, 0.01, density_at(t, 1 / 64, 0.01, 0.5), 1 / 64) for t in ts]
    assert max(m) <= 1.0
    assert ts[m.index(max(m))] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("anneal", list(Anneal))
def test_scheduled_k_never_grows_and_embeddings_follow_their_own_target(anneal):
    model = small_model()
    sp = Sparsifier(model, SparsityConfig(hidden_density=0.25, embed_density=0.5, anneal=anneal), total_steps=200)
    for p in sp.params:
        ks = [sp.plan(step).k[p.name] for step in range(201)]
        assert ks[0] == p.param.numel() and all(a >= b for a, b in zip(ks, ks[1:]))
        assert ks[-1] == math.floor({"hidden": 0.25, "embed": 0.5}[p.kind] * p.param.numel())
        assert ks[100] == ks[-1]  # the target is reached at anneal_end = 50%
