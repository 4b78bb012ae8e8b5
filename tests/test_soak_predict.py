"""Soak: predicting 200 tiny cases in one process keeps resident memory flat (benchmarks/soak_predict.py).

The 2,000-case run and its numbers are in docs/benchmarks.md; this is the suite's short version, with the same
code path (Predictor.from_run + medseg.inference.batch, post-processing on, atomic NIfTI writes). The soak runs
in a fresh process: inside a test session that has already freed a lot of memory, new allocations reuse resident
pages and even a planted leak does not move RSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PROJECT_ROOT, benchmark_module

pytestmark = pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS is read from /proc (Linux)")

GROWTH_LIMIT_MB = 50.0   # issue 19: < 50 MB from case 100 to case 2,000
SOAK = benchmark_module("soak_predict")


def _soak(tmp_path: Path, *args: str):
    series = tmp_path / "soak.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "benchmarks" / "soak_predict.py"),
                           "--work", str(tmp_path / "work"), "--json", str(series), "--folds", "0", "--no-tta", *args],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SOAK.SoakResult(**json.loads(series.read_text()))


def test_200_cases_keep_rss_flat_and_a_planted_leak_shows(tmp_path):
    # 200 clean cases, then 15 more that each keep 3 MB: the second part proves that RSS sees a leak
    res = _soak(tmp_path, "--cases", "215", "--warmup", "50", "--leak-mb", "3", "--leak-after", "200")
    assert res.statuses == {"written": 215} and len(res.rss) == 215
    assert len(list((tmp_path / "work" / "out").glob("case_*.nii.gz"))) == 215
    clean = res.rss[:200]
    assert clean[-1] - clean[49] < GROWTH_LIMIT_MB, clean[49::10]
    # a steady leak shows as a slope: projected over 1,900 cases it must stay within the same bound
    slope = np.polyfit(np.arange(50, 201), clean[49:], 1)[0]
    assert slope * 1900 < GROWTH_LIMIT_MB, f"{slope * 1024:.1f} KB per case"
    assert res.rss[-1] - res.rss[199] > 30.0, res.rss[195:]      # 45 MB planted
