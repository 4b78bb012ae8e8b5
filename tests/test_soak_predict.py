"""Soak: predicting 200 tiny cases in one process keeps resident memory flat (benchmarks/soak_predict.py).

The 2,000-case run and its numbers are in docs/benchmarks.md; this is the suite's short version, with the same
code path (Predictor.from_run + medseg.inference.batch, post-processing on, atomic NIfTI writes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import benchmark_module

pytestmark = pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS is read from /proc (Linux)")

GROWTH_LIMIT_MB = 50.0   # issue 19: < 50 MB from case 100 to case 2,000


SOAK = benchmark_module("soak_predict")


@pytest.fixture(scope="module")
def soak_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("soak")
    return SOAK.make_run(root / "run"), SOAK.make_cases(root / "in", 200)


def test_200_cases_keep_rss_flat(soak_inputs, tmp_path):
    run, inputs = soak_inputs
    res = SOAK.soak(run, inputs, tmp_path / "out", folds=[0], tta=False)
    assert res.statuses == {"written": 200} and len(res.rss) == 200
    assert len(list((tmp_path / "out").glob("case_*.nii.gz"))) == 200
    assert res.growth(50) < GROWTH_LIMIT_MB, res.rss[49::10]
    # a steady leak shows as a slope: projected over 1,900 cases it must stay within the same bound
    slope = np.polyfit(np.arange(50, 201), res.rss[49:], 1)[0]
    assert slope * 1900 < GROWTH_LIMIT_MB, f"{slope * 1024:.1f} KB per case"


def test_a_planted_leak_is_measured(soak_inputs, tmp_path):
    """The RSS series sees memory that a case keeps: 2 MB held per case shows as >= 25 MB over 15 cases."""
    run, _ = soak_inputs
    inputs = SOAK.make_cases(tmp_path / "in", 20, seed=1)
    kept = []
    res = SOAK.soak(run, inputs, tmp_path / "out", folds=[0], tta=False,
                    on_case=lambda _: kept.append(np.full(2**18, 1.0)))
    assert res.growth(5) > 25.0, res.rss
