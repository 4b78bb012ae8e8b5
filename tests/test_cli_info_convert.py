"""`medseg info` and `medseg convert` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from test_io_dicom import write_series  # tests/ is on sys.path (pytest's default prepend import mode)

from medseg.cli.main import main
from medseg.io import Volume, read_volume, write_volume
from medseg.io.dicom_seg import read_dicom_seg

CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


@pytest.fixture
def nifti(tmp_path):
    aff = np.array([[0, 0, -2.5, 40.0], [-0.8, 0, 0, 12.0], [0, 1.2, 0, -7.5], [0, 0, 0, 1]])
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(1, 4, 5, 6) - 10
    path = tmp_path / "img.nii.gz"
    write_volume(Volume(arr, aff), path)
    return path


def test_info_text_and_json(nifti, capsys):
    assert main(["info", str(nifti)]) == 0
    text = capsys.readouterr().out
    for fragment in ("4 x 5 x 6", "0.8 x 1.2 x 2.5 mm", "orientation  PSL", "(40, 12, -7.5)", "int16", "-10 .. 109"):
        assert fragment in text, fragment
    assert main(["info", "--json", str(nifti)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == [4, 5, 6] and info["spacing"] == [0.8, 1.2, 2.5] and info["orientation"] == "PSL"
    assert info["min"] == -10 and info["max"] == 109 and info["dtype"] == "int16" and info["sform_code"] == 1


def test_info_dicom_folder_lists_series_and_describes_one(tmp_path, capsys):
    a = write_series(tmp_path / "d" / "a", [np.array([0, 0, 3.0 * k]) for k in range(3)], description="T1")
    b = write_series(tmp_path / "d" / "b", [np.array([0, 0, 3.0 * k]) for k in range(4)], description="T2")
    assert main(["info", "--json", str(tmp_path / "d")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {(s["uid"], s["slices"]) for s in info["series"]} == {(a, 3), (b, 4)}
    assert "shape" not in info and "--series" in info["note"]
    assert main(["info", str(tmp_path / "d"), "--series", b]) == 0
    text = capsys.readouterr().out
    assert "5 x 6 x 4" in text and "'T2'" in text and "0.6 x 0.8 x 3 mm" in text


def test_info_shared_dicom_folder(shared_data, capsys):
    folder = shared_data("dicom", "tcia_pgbm003")
    assert main(["info", str(folder)]) == 0
    text = capsys.readouterr().out
    assert text.count("  series ") == 5 and "FLAIR_reg" in text and "HippoCrop" in text


def test_convert_chain_keeps_geometry(nifti, tmp_path, capsys):
    src = read_volume(nifti)
    assert main(["convert", str(nifti), str(tmp_path / "a.nrrd")]) == 0
    assert main(["convert", str(tmp_path / "a.nrrd"), str(tmp_path / "b.mha"), "--dtype", "float32"]) == 0
    assert main(["convert", str(tmp_path / "b.mha"), str(tmp_path / "c.nii")]) == 0
    out = read_volume(tmp_path / "c.nii")
    assert out.array.dtype == np.float32
    np.testing.assert_array_equal(out.array, src.array.astype(np.float32))
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)
    assert "wrote" in capsys.readouterr().out


def test_convert_refuses_overwrite_same_path_and_bad_suffix(nifti, tmp_path, capsys):
    target = tmp_path / "t.nrrd"
    target.write_text("keep me")
    assert main(["convert", str(nifti), str(target)]) == 1
    assert "already exists" in capsys.readouterr().err and target.read_text() == "keep me"
    assert main(["convert", str(nifti), str(target), "--overwrite"]) == 0
    assert read_volume(target).shape == (4, 5, 6)
    before = nifti.read_bytes()
    assert main(["convert", str(nifti), str(nifti), "--overwrite"]) == 1
    assert "is the input itself" in capsys.readouterr().err and nifti.read_bytes() == before
    assert main(["convert", str(nifti), str(tmp_path / "x.jpeg")]) == 1
    assert "unknown file type" in capsys.readouterr().err


def test_convert_expect_3d_refuses_4d(tmp_path, capsys):
    path = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7, 3), np.float32), np.eye(4)), path)
    assert main(["convert", str(path), str(tmp_path / "o.nii.gz"), "--expect", "3d"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"medseg convert: error: {path}: has 4 dimensions (5, 6, 7, 3) (3 channels or time points); "
                   "expected a 3D image")
    assert main(["convert", str(path), str(tmp_path / "o.nii.gz")]) == 0  # without --expect: 3 channels


def test_convert_dicom_series_choice_and_png_spacing(tmp_path):
    write_series(tmp_path / "d" / "a", [np.array([0, 0, 3.0 * k]) for k in range(3)])
    b = write_series(tmp_path / "d" / "b", [np.array([0, 0, 3.0 * k]) for k in range(4)])
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "b.nii.gz"), "--series", b]) == 0
    assert read_volume(tmp_path / "b.nii.gz").shape == (5, 6, 4)
    write_volume(Volume(np.ones((1, 8, 4), np.uint8), np.eye(4)), tmp_path / "p.png")
    assert main(["convert", str(tmp_path / "p.png"), str(tmp_path / "p.nii.gz"), "--spacing", "0.3", "0.2"]) == 0
    assert read_volume(tmp_path / "p.nii.gz").spacing == pytest.approx((0.3, 0.2))


def test_convert_label_to_dicom_seg_and_back(tmp_path):
    img = read_volume(CT5N)
    lab = np.zeros((1, *img.shape), np.uint8)
    lab[0, 2:10, 3:7, 1:4] = 1
    write_volume(img.with_array(lab), tmp_path / "lab.nii.gz")
    seg = tmp_path / "lab.dcm"
    assert main(["convert", str(tmp_path / "lab.nii.gz"), str(seg), "--source", str(CT5N), "--labels", "1=lesion"]) == 0
    back, names = read_dicom_seg(seg, source_dir=CT5N)
    assert names == {1: "lesion"}
    np.testing.assert_array_equal(back.array, lab)
    assert main(["convert", str(seg), str(tmp_path / "back.nii.gz")]) == 0
    np.testing.assert_array_equal(read_volume(tmp_path / "back.nii.gz").array, lab)


def test_info_reports_non_finite_and_bad_spacing_is_one_line(tmp_path, capsys):
    arr = np.ones((1, 3, 4, 5), np.float32)
    arr[0, 1, 1, 1] = np.nan
    write_volume(Volume(arr, np.eye(4)), tmp_path / "nan.nii.gz")
    assert main(["info", str(tmp_path / "nan.nii.gz")]) == 0
    assert "non-finite   1 voxels" in capsys.readouterr().out
    write_volume(Volume(np.ones((1, 8, 4), np.uint8), np.eye(4)), tmp_path / "p.png")
    assert main(["convert", str(tmp_path / "p.png"), str(tmp_path / "o.nii.gz"), "--spacing", "-1"]) == 1
    assert capsys.readouterr().err.strip() == ("medseg convert: error: spacing=-1.0 is invalid; expected one or 2 "
                                               "positive numbers (mm)")
