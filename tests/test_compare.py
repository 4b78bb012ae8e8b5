"""medseg.evaluation.compare and `medseg compare`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from medseg.cli.main import main
from medseg.evaluation import write_per_case_csv
from medseg.evaluation.compare import compare_per_case, holm


def _tables(n=30, shift=0.05, seed=0):
    rng = np.random.default_rng(seed)
    a, b = {}, {}
    for i in range(n):
        d1 = float(rng.uniform(0.6, 0.9))
        h1 = float(rng.uniform(2, 6))
        a[f"c{i}"] = {1: {"dice": d1, "hd95_mm": h1}, 2: {"dice": 0.7, "hd95_mm": 3.0}}
        b[f"c{i}"] = {1: {"dice": d1 + shift + float(rng.normal(0, 0.01)), "hd95_mm": h1 + 1.0},
                      2: {"dice": 0.7, "hd95_mm": 3.0}}
    return a, b


def test_holm_matches_hand_computation():
    assert holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan], nan_ok=True)
    assert holm([0.5, 0.6]) == [1.0, 1.0]


def test_improvement_is_detected_in_the_right_direction():
    a, b = _tables()
    rows = {(r["label"], r["metric"]): r for r in compare_per_case(a, b, n_boot=500)}
    dice = rows[(1, "dice")]
    assert dice["verdict"] == "B better" and dice["n"] == 30
    assert dice["ci_low"] > 0 and dice["mean_diff"] == pytest.approx(dice["mean_b"] - dice["mean_a"])
    da = np.array([a[c][1]["dice"] for c in sorted(a)])
    db = np.array([b[c][1]["dice"] for c in sorted(a)])
    assert dice["p_wilcoxon"] == pytest.approx(stats.wilcoxon(da, db).pvalue)
    assert dice["p_ttest"] == pytest.approx(stats.ttest_rel(db, da).pvalue)
    # HD95 got worse by 1 mm: lower is better, so A wins
    assert rows[(1, "hd95_mm")]["verdict"] == "A better" and rows[(1, "hd95_mm")]["mean_diff"] == pytest.approx(1.0)
    # class 2 identical in both models
    assert rows[(2, "dice")]["p_wilcoxon"] == 1.0 and rows[(2, "dice")]["verdict"] == "no significant difference"


def test_small_noisy_difference_is_not_called_significant():
    a, b = _tables(n=8, shift=0.0, seed=3)
    for i, case in enumerate(sorted(b)):  # differences +-0.01 alternating: mean difference exactly 0
        b[case][1]["dice"] = a[case][1]["dice"] + (0.01 if i % 2 else -0.01)
    rows = compare_per_case(a, b, metrics=["dice"], n_boot=300)
    assert rows[0]["p_wilcoxon"] > 0.5
    assert rows[0]["verdict"] == "no significant difference" and rows[0]["ci_low"] < 0 < rows[0]["ci_high"]


def test_non_finite_pairs_are_excluded_and_counted():
    a, b = _tables(n=10)
    a["c0"][1]["hd95_mm"] = math.inf
    b["c1"][1]["hd95_mm"] = math.nan
    rows = {(r["label"], r["metric"]): r for r in compare_per_case(a, b, n_boot=100)}
    assert rows[(1, "hd95_mm")]["n"] == 8 and rows[(1, "hd95_mm")]["n_excluded"] == 2


def test_cli_compare_writes_table_json_and_plot(tmp_path, capsys):
    a, b = _tables(n=12)
    pa = write_per_case_csv(a, tmp_path / "modelA" / "per_case.csv")
    pb = write_per_case_csv(b, tmp_path / "modelB" / "per_case.csv")
    out = tmp_path / "cmp"
    assert main(["compare", str(pa), str(pb), "-o", str(out), "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    assert "modelA" in printed and "B better" in printed
    record = json.loads((out / "comparison.json").read_text())
    assert record["n_cases"] == 12 and len(record["rows"]) == 4
    png = (out / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (out / "comparison.csv").read_text().startswith("label,name,metric")


def test_cli_compare_errors_are_one_line(tmp_path, capsys):
    a, _ = _tables(n=3)
    pa = write_per_case_csv(a, tmp_path / "a.csv")
    pb = write_per_case_csv({"other": a["c0"]}, tmp_path / "b.csv")
    assert main(["compare", str(pa), str(pb), "-o", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shares no case" in err
    (tmp_path / "bad.csv").write_text("foo,bar\n1,2\n")
    assert main(["compare", str(pa), str(tmp_path / "bad.csv")]) == 1
    assert "has no column" in capsys.readouterr().err
    assert main(["compare", str(pa), str(pa), "--metrics", "nope", "-o", str(tmp_path)]) == 1
    assert "not in both tables" in capsys.readouterr().err
