"""medseg.evaluation (folder evaluation, summaries, per_case.csv) and `medseg evaluate`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from medseg.cli.main import main
from medseg.errors import InputError
from medseg.evaluation import (
    bootstrap_ci,
    describe,
    evaluate_folder,
    read_per_case_csv,
    summarize_metrics,
    write_per_case_csv,
)
from medseg.io import Volume, read_volume, write_volume
from medseg.metrics import compute_metrics

AFFINE = np.array([[0.0, 0.0, 2.5, -30.0], [-0.8, 0.0, 0.0, 12.0], [0.0, 1.1, 0.0, 5.0], [0, 0, 0, 1]])


def _label_map(rng: np.random.Generator, shape=(20, 18, 10)) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    c = np.array(shape) // 2 + rng.integers(-2, 3, size=3)
    lab[c[0] - 5:c[0], c[1] - 4:c[1] + 4, c[2] - 3:c[2] + 3] = 1
    lab[c[0]:c[0] + 5, c[1] - 4:c[1] + 4, c[2] - 3:c[2] + 3] = 2
    return lab


def _make_folders(tmp_path, n=4, affine=AFFINE):
    rng = np.random.default_rng(0)
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    refs, preds = {}, {}
    for i in range(n):
        ref = _label_map(rng)
        pred = ref.copy()
        if i % 2:  # erode class 2 in odd cases
            pred[(ref == 2) & ~ndimage.binary_erosion(ref == 2)] = 0
        refs[f"case_{i:03d}"], preds[f"case_{i:03d}"] = ref, pred
        write_volume(Volume(ref[None], affine), ref_dir / f"case_{i:03d}.nii.gz")
        write_volume(Volume(pred[None], affine), pred_dir / f"case_{i:03d}.nii.gz")
    return pred_dir, ref_dir, preds, refs


def test_evaluate_folder_matches_compute_metrics_and_uses_file_spacing(tmp_path):
    pred_dir, ref_dir, preds, refs = _make_folders(tmp_path)
    ev = evaluate_folder(pred_dir, ref_dir, n_boot=200)
    assert sorted(ev.per_case) == sorted(refs) and ev.label_names == {1: "1", 2: "2"}
    spacing = read_volume(ref_dir / "case_001.nii.gz").spacing
    assert spacing == pytest.approx((0.8, 1.1, 2.5))
    expected = compute_metrics(preds["case_001"], refs["case_001"], spacing, [1, 2])
    for label in (1, 2):
        for metric, value in expected[label].items():
            assert ev.per_case["case_001"][label][metric] == pytest.approx(value, nan_ok=True)
    assert ev.per_case["case_000"][2]["dice"] == 1.0 and ev.per_case["case_001"][2]["dice"] < 1.0
    s = ev.summary["classes"]["2"]["metrics"]["dice"]
    assert s["n"] == 4 and s["ci_low"] <= s["mean"] <= s["ci_high"] < 1.0 + 1e-12


def test_cli_evaluate_writes_csv_and_summary_and_prints_table(tmp_path, capsys):
    pred_dir, ref_dir, _, _ = _make_folders(tmp_path, n=3)
    (ref_dir / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "anterior",
                                                                 "2": "posterior"}}))
    out = tmp_path / "eval"
    before = {p.name: p.read_bytes() for p in pred_dir.iterdir()}
    rc = main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "-o", str(out), "--bootstrap", "100"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "anterior" in printed and "posterior" in printed and "foreground mean" in printed
    per_case, names = read_per_case_csv(out / "per_case.csv")
    assert names == {1: "anterior", 2: "posterior"} and len(per_case) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"]["1"]["name"] == "anterior"
    assert set(summary["classes"]["1"]["metrics"]["hd95_mm"]) >= {"mean", "median", "sd", "ci_low", "ci_high", "n"}
    assert {p.name: p.read_bytes() for p in pred_dir.iterdir()} == before  # inputs untouched


def test_geometry_mismatch_is_one_line_error_naming_both_files(tmp_path, capsys):
    pred_dir, ref_dir, preds, _ = _make_folders(tmp_path, n=2)
    shifted = AFFINE.copy()
    shifted[:3, 3] += [0.0, 0.0, 3.0]
    bad = pred_dir / "case_001.nii.gz"
    write_volume(Volume(preds["case_001"][None], shifted), bad)
    rc = main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(bad) in err and str(ref_dir / "case_001.nii.gz") in err and "origin" in err


def test_shape_mismatch_names_shapes(tmp_path):
    pred_dir, ref_dir, _, _ = _make_folders(tmp_path, n=1)
    write_volume(Volume(np.zeros((1, 20, 18, 11), np.uint8), AFFINE), pred_dir / "case_000.nii.gz")
    with pytest.raises(InputError, match=r"shape \(20, 18, 11\) vs \(20, 18, 10\)"):
        evaluate_folder(pred_dir, ref_dir)


def test_missing_and_orphan_predictions(tmp_path):
    pred_dir, ref_dir, _, _ = _make_folders(tmp_path, n=3)
    (pred_dir / "case_002.nii.gz").unlink()
    with pytest.raises(InputError, match="no prediction for 1 reference"):
        evaluate_folder(pred_dir, ref_dir)
    ev = evaluate_folder(pred_dir, ref_dir, allow_missing=True, n_boot=50)
    assert sorted(ev.per_case) == ["case_000", "case_001"] and ev.missing == ["case_002"]
    write_volume(Volume(np.zeros((1, 4, 4, 4), np.uint8), AFFINE), pred_dir / "stray.nii.gz")
    with pytest.raises(InputError, match="has no reference"):
        evaluate_folder(pred_dir, ref_dir, allow_missing=True)


def test_labels_found_per_case_are_filled_when_absent(tmp_path):
    pred_dir, ref_dir, preds, refs = _make_folders(tmp_path, n=2)
    extra = refs["case_000"].copy()
    extra[0, 0, 0] = 3  # class 3 exists only in case_000's reference
    write_volume(Volume(extra[None], AFFINE), ref_dir / "case_000.nii.gz")
    ev = evaluate_folder(pred_dir, ref_dir, n_boot=50)
    assert ev.label_names == {1: "1", 2: "2", 3: "3"}
    assert ev.per_case["case_000"][3]["dice"] == 0.0
    assert math.isnan(ev.per_case["case_001"][3]["dice"]) and ev.per_case["case_001"][3]["accuracy"] == 1.0
    assert ev.summary["classes"]["3"]["metrics"]["dice"]["n_nan"] == 1


def test_describe_counts_nan_and_inf_and_bootstrap_is_reproducible():
    d = describe([1.0, 2.0, 3.0, math.nan, math.inf], n_boot=500, rng=1)
    assert d["n"] == 3 and d["n_nan"] == 1 and d["n_inf"] == 1
    assert d["mean"] == 2.0 and d["median"] == 2.0 and d["sd"] == pytest.approx(1.0)
    assert 1.0 <= d["ci_low"] < 2.0 < d["ci_high"] <= 3.0
    assert bootstrap_ci([1, 5, 2, 8], rng=3) == bootstrap_ci([1, 5, 2, 8], rng=3)
    assert bootstrap_ci([4.0]) == (4.0, 4.0)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    # a CI from normal data covers the true mean at about the nominal rate (here: one wide check)
    x = np.random.default_rng(0).normal(10.0, 2.0, size=200)
    lo, hi = bootstrap_ci(x, n_boot=1000)
    assert lo < 10.0 < hi and hi - lo == pytest.approx(2 * 1.96 * 2.0 / np.sqrt(200), rel=0.2)


def test_summarize_metrics_in_memory_and_csv_round_trip(tmp_path):
    per_case = {
        "a": {1: {"dice": 0.8, "hd95_mm": 2.0}, 2: {"dice": 0.6, "hd95_mm": math.inf}},
        "b": {1: {"dice": 0.9, "hd95_mm": 1.0}, 2: {"dice": math.nan, "hd95_mm": math.nan}},
    }
    s = summarize_metrics(per_case, label_names={1: "x", 2: "y"}, n_boot=100)
    assert s["classes"]["1"]["metrics"]["dice"]["mean"] == pytest.approx(0.85)
    assert s["classes"]["2"]["metrics"]["hd95_mm"]["n_inf"] == 1
    assert s["foreground_mean"]["dice"] == pytest.approx((0.85 + 0.6) / 2)
    path = write_per_case_csv(per_case, tmp_path / "per_case.csv", label_names={1: "x", 2: "y"})
    back, names = read_per_case_csv(path)
    assert names == {1: "x", 2: "y"}
    assert back["a"][2]["hd95_mm"] == math.inf and math.isnan(back["b"][2]["dice"])
    assert back["a"][1] == per_case["a"][1]


@pytest.mark.shared_data
def test_real_hippocampus_labels(shared_data, tmp_path):
    labels = shared_data("hippocampus", "labelsTr")
    files = sorted(labels.glob("hippocampus_*.nii.gz"))[:3]
    pred_dir = tmp_path / "pred"
    for f in files:  # a "prediction": the reference with class 1 dilated by one voxel into the background
        vol = read_volume(f)
        lab = vol.array[0].astype(np.uint8)
        grown = ndimage.binary_dilation(lab == 1) & (lab == 0)
        lab[grown] = 1
        write_volume(vol.with_array(lab[None]), pred_dir / f.name)
    ev = evaluate_folder(pred_dir, labels, allow_missing=True, n_boot=100)
    assert ev.label_names[1].lower() == "anterior" and set(ev.per_case) == {f.name[:-7] for f in files}
    for res in ev.per_case.values():
        assert 0.5 < res[1]["dice"] < 1.0 and res[2]["dice"] == 1.0
        assert res[1]["volume_diff_ml"] > 0 and res[1]["hd95_mm"] >= 1.0
