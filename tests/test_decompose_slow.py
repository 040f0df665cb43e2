"""Slow (marked `slow`, out of the default run): SPD and APD recover TMS 40-10 from the published random start.

    python -m pytest -m slow tests/test_decompose_slow.py

Each run is the command's own code path (`sparse_lm.decompose.run.run`) with the `tms_40_10` preset's settings
(batch 4096, 10,000 steps per SPD seed; APD: the `tms_40_10_apd` settings). The default suite covers the same code
with the oracle start and short runs. Measured wall times and results: docs/decompose.md.
"""

from __future__ import annotations

import pytest

from sparse_lm.decompose.run import run
from tests.test_decompose import compose_decompose

pytestmark = pytest.mark.slow
FEATURES = 40


def recovered(final: dict, name: str) -> bool:
    """Every feature's piece found (the published, support-restricted metric), at the right size, with about one
    live subcomponent per feature."""
    return (final[f"{name}/mmcs_support"] >= 0.99 and 0.9 <= final[f"{name}/l2_ratio_support"] <= 1.1
            and abs(final[f"{name}/live"] - FEATURES) <= FEATURES // 10)


@pytest.fixture(scope="module")
def spd_seeds(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("spd")
    return [run(compose_decompose("decompose=tms_40_10", f"seed={s}", f"out_dir={out / f'seed{s}'}"), log=print)["final"]
            for s in range(3)]


def test_spd_recovers_the_first_matrix_in_two_of_three_seeds(spd_seeds):
    assert sum(recovered(f, "linear1") for f in spd_seeds) >= 2, spd_seeds


@pytest.mark.xfail(strict=True, reason="measured 2026-12-03: W2 settles on a dense basis of about 10 pieces (docs/decompose.md)")
def test_spd_recovers_both_matrices_in_two_of_three_seeds(spd_seeds):
    assert sum(recovered(f, "linear1") and recovered(f, "linear2") for f in spd_seeds) >= 2, spd_seeds


@pytest.mark.xfail(strict=True, reason="measured 2026-12-03: mean max cosine 0.973 (W1) and 0.972 (W2) (docs/decompose.md)")
def test_apd_recovers_tms_40_10(tmp_path):
    final = run(compose_decompose("decompose=tms_40_10_apd", f"out_dir={tmp_path / 'apd'}"), log=print)["final"]
    assert final["linear1/mmcs_support"] >= 0.98 and final["linear2/mmcs_support"] >= 0.98, final
