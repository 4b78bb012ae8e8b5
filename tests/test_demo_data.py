"""The synthetic demo data set: deterministic, geometry-rich, learnable, MSD layout plus patient manifest."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medseg.cli.main import main
from medseg.data.checks import check_dataset
from medseg.data.demo import demo_case, demo_patients, make_demo_dataset
from medseg.data.manifest import load_manifest
from medseg.errors import InputError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", n_cases=6, seed=5)


def test_layout_and_dataset_json(demo):
    meta = json.loads((demo / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "bright", "2": "dark"}
    assert meta["numTraining"] == 6 and len(meta["training"]) == 6
    for entry in meta["training"]:
        assert (demo / entry["image"]).is_file() and (demo / entry["label"]).is_file()
    man = load_manifest(demo)
    assert man.patients() == {"patient_000": ["demo_000", "demo_001"],
                              "patient_001": ["demo_002", "demo_003", "demo_004"],
                              "patient_002": ["demo_005"]}
    report = check_dataset(man)
    assert report.ok and report.problems == []
    assert report.label_presence() == {0: 6, 1: 6, 2: 6}


def test_geometry_is_oblique_anisotropic_and_shared_by_label(demo):
    for i in range(6):
        img = nib.load(str(demo / "imagesTr" / f"demo_{i:03d}.nii.gz"))
        lab = nib.load(str(demo / "labelsTr" / f"demo_{i:03d}.nii.gz"))
        assert all(32 <= s <= 48 for s in img.shape) and img.shape == lab.shape
        np.testing.assert_allclose(img.affine, lab.affine, atol=1e-6)
        rot = img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0)
        assert np.abs(rot - np.eye(3)).max() > 0.05, "affine must be oblique"
        zooms = np.array(img.header.get_zooms())
        assert zooms.max() / zooms.min() > 1.3, "spacing must be anisotropic"
        assert np.abs(img.affine[:3, 3]).max() > 1.0
        assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8


def test_deterministic_from_seed(tmp_path):
    a = make_demo_dataset(tmp_path / "a", n_cases=3, seed=2)
    b = make_demo_dataset(tmp_path / "b", n_cases=3, seed=2)
    c = make_demo_dataset(tmp_path / "c", n_cases=3, seed=3)
    for sub in ("imagesTr/demo_002.nii.gz", "labelsTr/demo_002.nii.gz"):
        arr = [np.asarray(nib.load(str(d / sub)).dataobj) for d in (a, b, c)]
        np.testing.assert_array_equal(arr[0], arr[1])
        assert arr[0].shape != arr[2].shape or not np.array_equal(arr[0], arr[2])
    assert (a / "manifest.csv").read_text() == (b / "manifest.csv").read_text()


def test_scans_of_one_patient_share_anatomy_not_noise():
    img0, lab0, aff0 = demo_case(0, patient=1, scan=2)
    img1, lab1, aff1 = demo_case(0, patient=1, scan=3)
    other = demo_case(0, patient=2, scan=5)[1]
    assert img0.shape == img1.shape
    dice = 2 * np.sum((lab0 == 1) & (lab1 == 1)) / (np.sum(lab0 == 1) + np.sum(lab1 == 1))
    assert dice > 0.7
    assert not np.allclose(aff0, aff1) and not np.allclose(img0, img1)
    assert other.shape != lab0.shape or not np.array_equal(other, lab0)


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(2 * np.sum(pred & ref) / (pred.sum() + ref.sum()))


def test_structures_are_separable_by_intensity():
    """Contrast-to-noise is high enough that smoothed thresholds already segment both classes well, so a small
    U-Net learns them in a few CPU minutes."""
    for scan in range(4):
        image, label, _ = demo_case(9, patient=scan, scan=scan)
        bright_mean, dark_mean = image[label == 1].mean(), image[label == 2].mean()
        tissue = image[(label == 0) & (image > 60)].mean()
        assert bright_mean > tissue + 50 and dark_mean < tissue - 40
        smooth = ndimage.gaussian_filter(image, 1.0)
        bright = smooth > (tissue + bright_mean) / 2
        body = ndimage.binary_erosion(ndimage.binary_fill_holes(smooth > 55), iterations=2)
        dark = body & (smooth < (tissue + dark_mean) / 2)
        assert _dice(bright, label == 1) > 0.85, scan
        assert _dice(dark, label == 2) > 0.7, scan


def test_demo_patients_pattern():
    assert demo_patients(1) == [0]
    assert demo_patients(6) == [0, 0, 1, 1, 1, 2]
    assert len(set(demo_patients(12))) == 9


def test_refuses_non_empty_folder_unless_forced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "mine.txt"
    keep.write_text("user file")
    with pytest.raises(InputError, match="is not empty"):
        make_demo_dataset(out, n_cases=2)
    make_demo_dataset(out, n_cases=2, force=True)
    assert keep.read_text() == "user file" and (out / "dataset.json").is_file()
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        make_demo_dataset(tmp_path / "f")


def test_cli_demo_data(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["demo-data", str(out), "-n", "3", "--seed", "1"]) == 0
    assert "wrote 3 demo cases" in capsys.readouterr().out
    assert len(list((out / "imagesTr").glob("*.nii.gz"))) == 3
    assert main(["demo-data", str(out)]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert main(["demo-data", str(tmp_path / "e"), "-n", "0"]) == 1
