"""Round trips NIfTI/NRRD/MHA/PNG/TIFF -> Volume -> file with oblique, anisotropic, non-identity affines."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from medseg.io import Volume, read_volume, write_volume
from medseg.io.volume import LPS_TO_RAS


def _affine(kind: str) -> np.ndarray:
    a = np.eye(4)
    if kind == "oblique_aniso":
        a[:3, :3] = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix() @ np.diag([0.7, 1.3, 3.1])
    elif kind == "flipped_lpi":  # reflection: LPI voxel order, anisotropic
        a[:3, :3] = np.diag([-0.9, -0.45, -2.5])
    elif kind == "permuted":  # axes swapped (sagittal-like storage) and oblique by a few degrees
        r = Rotation.from_euler("z", 7, degrees=True).as_matrix() @ np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0.0]])
        a[:3, :3] = r @ np.diag([1.1, 1.1, 4.8])
    a[:3, 3] = [-120.37, 85.21, -40.9]
    return a


AFFINES = ["oblique_aniso", "flipped_lpi", "permuted"]
DTYPES = [np.uint8, np.int16, np.uint16, np.float32, np.float64]


@pytest.mark.parametrize("ext", ["nii.gz", "nii", "nrrd", "mha"])
@pytest.mark.parametrize("kind", AFFINES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_3d_round_trip_keeps_array_affine_dtype(tmp_path, ext, kind, dtype):
    rng = np.random.default_rng(0)
    arr = (rng.random((1, 7, 9, 5)) * 200).astype(dtype)
    vol = Volume(arr, _affine(kind))
    path = tmp_path / f"img.{ext}"
    write_volume(vol, path)
    back = read_volume(path)
    assert back.array.dtype == arr.dtype
    np.testing.assert_array_equal(back.array, arr)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    assert back.spatial_dims == 3 and back.orientation() == vol.orientation()


@pytest.mark.parametrize("ext", ["nii.gz", "nrrd", "mha"])
def test_file_read_by_other_libraries_has_same_geometry(tmp_path, ext):
    vol = Volume(np.arange(7 * 9 * 5, dtype=np.int16).reshape(1, 7, 9, 5), _affine("oblique_aniso"))
    path = tmp_path / f"img.{ext}"
    write_volume(vol, path)
    img = sitk.ReadImage(str(path))
    lps = LPS_TO_RAS @ vol.affine
    np.testing.assert_allclose(img.GetOrigin(), lps[:3, 3], atol=1e-4)
    np.testing.assert_allclose(img.GetSpacing(), vol.spacing, atol=1e-5)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), LPS_TO_RAS[:3, :3] @ vol.direction, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), vol.array[0])
    if ext == "nii.gz":
        np.testing.assert_allclose(nib.load(path).affine, vol.affine, atol=1e-5)


@pytest.mark.parametrize("ext", ["nii.gz", "nrrd", "mha"])
def test_multichannel_and_sheared_affine_round_trip(tmp_path, ext):
    aff = _affine("oblique_aniso")
    aff[0, 1] += 0.4  # shear: no qform can hold it, NIfTI must fall back to the sform only
    arr = np.random.default_rng(1).random((3, 4, 5, 6)).astype(np.float32)
    vol = Volume(arr, aff)
    write_volume(vol, tmp_path / f"m.{ext}")
    back = read_volume(tmp_path / f"m.{ext}")
    assert back.channels == 3
    np.testing.assert_array_equal(back.array, arr)
    np.testing.assert_allclose(back.affine, aff, atol=1e-5)
    if ext == "nii.gz":
        hdr = nib.load(tmp_path / "m.nii.gz").header
        assert int(hdr["qform_code"]) == 0 and int(hdr["sform_code"]) > 0


def test_nifti_keeps_codes_intent_and_labels_int64(tmp_path):
    arr = np.random.default_rng(2).random((4, 5, 6)).astype(np.float32)
    img = nib.Nifti1Image(arr, _affine("flipped_lpi"))
    img.set_qform(_affine("flipped_lpi"), code=2)
    img.set_sform(_affine("flipped_lpi"), code=4)
    img.header.set_intent("t test", (12.0,), name="stat")
    nib.save(img, tmp_path / "a.nii.gz")
    vol = read_volume(tmp_path / "a.nii.gz")
    write_volume(vol, tmp_path / "b.nii.gz")
    hdr = nib.load(tmp_path / "b.nii.gz").header
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (2, 4)
    assert hdr.get_intent() == ("t test", (12.0,), "stat")
    # int64 label maps are stored as the smallest integer type that holds them (documented), values unchanged
    lab = vol.with_array(np.arange(120, dtype=np.int64).reshape(1, 4, 5, 6) % 3)
    write_volume(lab, tmp_path / "lab.nii.gz")
    back = read_volume(tmp_path / "lab.nii.gz")
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, lab.array)


def test_2d_nifti_round_trip_single_and_multichannel(tmp_path):
    aff = np.diag([0.3, 0.25, 1.0, 1.0])
    aff[:3, 3] = [5.0, -7.0, 0.0]
    for c in (1, 3):
        arr = np.random.default_rng(c).integers(0, 255, (c, 11, 8)).astype(np.uint8)
        vol = Volume(arr, aff)
        assert vol.spatial_dims == 2
        write_volume(vol, tmp_path / f"x{c}.nii.gz")
        back = read_volume(tmp_path / f"x{c}.nii.gz")
        assert back.spatial_dims == 2 and back.channels == c
        np.testing.assert_array_equal(back.array, arr)
        np.testing.assert_allclose(back.affine, aff, atol=1e-6)


@pytest.mark.parametrize("ext,dtype", [("png", np.uint8), ("png", np.uint16), ("tif", np.float32)])
def test_2d_png_tiff_round_trip(tmp_path, ext, dtype):
    arr = (np.random.default_rng(3).random((1, 13, 7)) * 250).astype(dtype)
    arr[0, 0, 0] = 0
    arr[0, 12, 0] = 200  # last column, first row: checks the (column, row) axis order
    vol = Volume(arr, np.eye(4))
    write_volume(vol, tmp_path / f"a.{ext}")
    back = read_volume(tmp_path / f"a.{ext}")
    assert back.spatial_dims == 2 and back.array.dtype == dtype and back.shape == (13, 7)
    np.testing.assert_array_equal(back.array, arr)
    # the file itself is 7 rows x 13 columns
    assert sitk.ReadImage(str(tmp_path / f"a.{ext}")).GetSize() == (13, 7)
    assert read_volume(tmp_path / f"a.{ext}", spacing=(0.5, 0.2)).spacing == (0.5, 0.2)


def test_png_rgb_channels_and_label_cast(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 255, (3, 6, 5)).astype(np.uint8)
    write_volume(Volume(rgb, np.eye(4)), tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_volume(tmp_path / "rgb.png").array, rgb)
    lab = np.zeros((1, 6, 5), dtype=np.int64)
    lab[0, 2:4, 1:3] = 2
    write_volume(Volume(lab, np.eye(4)), tmp_path / "lab.png")
    back = read_volume(tmp_path / "lab.png")
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, lab)


def test_real_hippocampus_case_round_trips(shared_data, tmp_path):
    src = shared_data("hippocampus", "imagesTr")
    path = sorted(src.glob("*.nii.gz"))[0]
    vol = read_volume(path)
    for ext in ("nii.gz", "nrrd", "mha"):
        write_volume(vol, tmp_path / f"h.{ext}")
        back = read_volume(tmp_path / f"h.{ext}")
        np.testing.assert_array_equal(back.array, vol.array)
        np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
