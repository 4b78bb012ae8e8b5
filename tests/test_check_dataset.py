"""medseg check-dataset: one line per problem naming the file; reading goes on past a broken case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.cli.main import main
from medseg.data.checks import Problem, check_dataset
from medseg.data.manifest import load_manifest

AFFINE = np.array([[0.0, -1.2, 0.0, 10.0], [0.9, 0.0, 0.1, -5.0], [0.0, 0.0, 2.5, 3.0], [0, 0, 0, 1]])


def _save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _dataset(root: Path, n: int = 3, shape=(8, 7, 6)) -> Path:
    rng = np.random.default_rng(0)
    training = []
    for i in range(n):
        cid = f"c{i}"
        _save(root / "imagesTr" / f"{cid}.nii.gz", rng.normal(size=shape).astype(np.float32))
        lab = np.zeros(shape, np.uint8)
        lab[2:4, 2:4, 2:4] = 1
        lab[5, 5, 4] = 2
        _save(root / "labelsTr" / f"{cid}.nii.gz", lab)
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
    meta = {"name": "Toy", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"},
            "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _check(root: Path):
    return check_dataset(load_manifest(root))


def _only_error(report, path: Path) -> str:
    assert len(report.errors) == 1, [str(p) for p in report.problems]
    line = str(report.errors[0])
    assert line.startswith(str(path) + ": ") and "\n" not in line
    return line


def test_clean_dataset_passes(tmp_path):
    report = _check(_dataset(tmp_path / "ds"))
    assert report.ok and report.problems == []
    assert report.label_presence() == {0: 3, 1: 3, 2: 3}
    assert any("3 cases of 3 patients" in line for line in report.summary_lines())


def test_nan_and_inf_voxels(tmp_path):
    root = _dataset(tmp_path / "ds")
    img = root / "imagesTr" / "c1.nii.gz"
    arr = nib.load(str(img)).get_fdata().astype(np.float32)
    arr[0, 0, 0] = np.nan
    arr[1, 1, 1] = np.nan
    arr[2, 2, 2] = np.inf
    _save(img, arr)
    line = _only_error(_check(root), img)
    assert "2 NaN voxel(s) and 1 Inf voxel(s)" in line and "finite values" in line


def test_label_shape_mismatch(tmp_path):
    root = _dataset(tmp_path / "ds")
    lab = _save(root / "labelsTr" / "c2.nii.gz", np.zeros((8, 7, 5), np.uint8))
    line = _only_error(_check(root), lab)
    assert "label shape 8x7x5 differs from image c2.nii.gz 8x7x6" in line


def test_label_spacing_and_affine_mismatch(tmp_path):
    root = _dataset(tmp_path / "ds")
    lab = np.asarray(nib.load(str(root / "labelsTr" / "c0.nii.gz")).dataobj)
    spaced = AFFINE.copy()
    spaced[:3, 2] *= 2
    p0 = _save(root / "labelsTr" / "c0.nii.gz", lab, spaced)
    moved = AFFINE.copy()
    moved[0, 3] += 0.5
    p1 = _save(root / "labelsTr" / "c1.nii.gz", lab, moved)
    report = _check(root)
    lines = {p.path: str(p) for p in report.errors}
    assert len(report.errors) == 2
    assert "label spacing (0.9, 1.2, 5.004) mm differs from image c0.nii.gz (0.9, 1.2, 2.502) mm" in lines[str(p0)]
    assert "label affine differs from image c1.nii.gz (origin by up to 0.5 mm" in lines[str(p1)]


def test_tolerance_accepts_tiny_affine_noise(tmp_path):
    root = _dataset(tmp_path / "ds")
    lab = np.asarray(nib.load(str(root / "labelsTr" / "c0.nii.gz")).dataobj)
    _save(root / "labelsTr" / "c0.nii.gz", lab, AFFINE + 1e-5)
    assert _check(root).ok


def test_undeclared_and_non_integer_label_values(tmp_path):
    root = _dataset(tmp_path / "ds")
    lab = np.zeros((8, 7, 6), np.uint8)
    lab[0, 0, 0], lab[1, 1, 1] = 7, 1
    p0 = _save(root / "labelsTr" / "c0.nii.gz", lab)
    frac = np.zeros((8, 7, 6), np.float32)
    frac[0, 0, 0] = 0.5
    p1 = _save(root / "labelsTr" / "c1.nii.gz", frac)
    report = _check(root)
    lines = {p.path: str(p) for p in report.errors}
    assert "label values [7] are not declared labels; expected values in [0, 1, 2]" in lines[str(p0)]
    assert "non-integer values [0.5]" in lines[str(p1)]


def test_empty_label_is_a_warning_not_an_error(tmp_path):
    root = _dataset(tmp_path / "ds")
    p = _save(root / "labelsTr" / "c0.nii.gz", np.zeros((8, 7, 6), np.uint8))
    report = _check(root)
    assert report.ok and len(report.warnings) == 1
    assert str(report.warnings[0]).startswith(f"{p}: label is empty")


def test_unreadable_case_is_reported_and_checking_goes_on(tmp_path):
    root = _dataset(tmp_path / "ds")
    bad = root / "imagesTr" / "c0.nii.gz"
    bad.write_text("this is not a NIfTI file")
    nan_img = root / "imagesTr" / "c2.nii.gz"
    _save(nan_img, np.full((8, 7, 6), np.nan, np.float32))
    report = _check(root)
    paths = sorted(p.path for p in report.errors)
    assert paths == sorted([str(bad), str(nan_img)])
    assert "cannot be read" in str(next(p for p in report.errors if p.path == str(bad)))


def test_channel_count_differs_from_declaration(tmp_path):
    root = _dataset(tmp_path / "ds")
    img = _save(root / "imagesTr" / "c1.nii.gz", np.zeros((8, 7, 6, 2), np.float32))
    line = _only_error(_check(root), img)
    assert "has 2 channel(s)" in line and "1 channel(s) as declared" in line


def test_problem_from_line_round_trip():
    p = Problem.from_line("/x/y.nii.gz: label of case y has no image (unpaired label); expected /x/images/y.nii.gz")
    assert p.path == "/x/y.nii.gz" and p.expected == "/x/images/y.nii.gz"
    assert str(p) == "/x/y.nii.gz: label of case y has no image (unpaired label); expected /x/images/y.nii.gz"


def test_cli_exit_codes_and_lines(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    assert main(["check-dataset", str(root)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    _save(root / "labelsTr" / "c2.nii.gz", np.zeros((4, 4, 4), np.uint8))
    assert main(["check-dataset", str(root), "-j", "2"]) == 1
    out = capsys.readouterr().out
    assert f"error: {root / 'labelsTr' / 'c2.nii.gz'}: label shape 4x4x4 differs" in out
    assert "1 error(s)" in out and out.strip().endswith("FAILED")


def test_cli_bad_folder_is_one_line_without_traceback(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["check-dataset", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"medseg check-dataset: error: {tmp_path / 'empty'}: is not a known data set layout" in err


def test_real_hippocampus_passes(shared_data):
    report = check_dataset(load_manifest(shared_data("hippocampus")), workers=2)
    assert len(report.cases) == 200
    assert report.ok and report.problems == [], [str(p) for p in report.problems[:5]]


@pytest.mark.parametrize("layout", ["images_labels", "msd"])
def test_real_unpaired_files_next_to_valid_pairs(shared_data, tmp_path, layout):
    src, unpaired = shared_data("hippocampus"), shared_data("hippocampus_unpaired")
    img_dir, lab_dir = ("images", "labels") if layout == "images_labels" else ("imagesTr", "labelsTr")
    root = tmp_path / "mixed"
    (root / img_dir).mkdir(parents=True)
    (root / lab_dir).mkdir()
    training = []
    for cid in ("hippocampus_004", "hippocampus_006"):
        shutil.copy(src / "imagesTr" / f"{cid}.nii.gz", root / img_dir)
        shutil.copy(src / "labelsTr" / f"{cid}.nii.gz", root / lab_dir)
        training.append({"image": f"./{img_dir}/{cid}.nii.gz", "label": f"./{lab_dir}/{cid}.nii.gz"})
    stray_img = root / img_dir / "hippocampus_118.nii.gz"
    stray_labs = [root / lab_dir / "hippocampus_010.nii.gz", root / lab_dir / "hippocampus_281.nii.gz"]
    shutil.copy(unpaired / "image_without_label_hippocampus_118.nii.gz", stray_img)
    shutil.copy(unpaired / "label_without_image_hippocampus_010.nii.gz", stray_labs[0])
    shutil.copy(unpaired / "label_without_image_hippocampus_281.nii.gz", stray_labs[1])
    if layout == "msd":
        (root / "dataset.json").write_text(json.dumps({"name": "Mixed", "modality": {"0": "MRI"},
                                                       "labels": {"0": "background", "1": "A", "2": "P"},
                                                       "training": training}))
    report = _check(root)
    by_path = {p.path: str(p) for p in report.errors}
    assert sorted(by_path) == sorted(map(str, [stray_img, *stray_labs])), [str(p) for p in report.problems]
    assert "image" in by_path[str(stray_img)] and "label" in by_path[str(stray_img)]
    for lab in stray_labs:
        assert "unpaired label" in by_path[str(lab)] or "label not listed" in by_path[str(lab)]
