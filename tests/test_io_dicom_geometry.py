"""Gantry tilt and uneven slice spacing: resampled onto a regular grid whose world positions are the slices' own."""

from __future__ import annotations

import logging

import numpy as np
import pydicom
import pytest
from scipy.ndimage import map_coordinates
from test_io_dicom import oblique_iop, write_series

from medseg.cli.main import main
from medseg.errors import InputError
from medseg.io import read_volume
from medseg.io.dicom_geometry import IrregularSlices, resample_irregular
from medseg.io.volume import LPS_TO_RAS, Volume


def _slice_pixels_world(folder):
    """(world LPS position, value) of every pixel of every slice, from the files' own IPP/IOP/PixelSpacing."""
    points, values = [], []
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        ipp = np.array(ds.ImagePositionPatient, dtype=float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        r, c = np.mgrid[: ds.Rows, : ds.Columns]
        world = ipp + c[..., None] * dc * iop[:3] + r[..., None] * dr * iop[3:]
        points.append(world.reshape(-1, 3))
        values.append(ds.pixel_array.astype(float).ravel())
    return np.concatenate(points), np.concatenate(values)


def _sample(vol, world_lps):
    """Trilinear samples of ``vol`` at LPS world points, and which points lie inside its grid."""
    ijk = np.linalg.solve(LPS_TO_RAS @ vol.affine, np.c_[world_lps, np.ones(len(world_lps))].T)[:3]
    inside = np.all((ijk > -1e-6) & (ijk < np.array(vol.shape)[:, None] - 1 + 1e-6), axis=0)
    return map_coordinates(vol.array[0].astype(float), ijk, order=1, mode="nearest", prefilter=False), inside


@pytest.mark.parametrize("iop", ["axial", "oblique"])
def test_tilted_series_resampled_onto_slice_positions(tmp_path, caplog, iop):
    iop = np.array([1.0, 0, 0, 0, 1, 0]) if iop == "axial" else oblique_iop()
    normal = np.cross(iop[:3], iop[3:])
    # tilted gantry: each slice 2 mm further along the normal and 0.7 mm further along the column direction
    pos = [np.array([3.0, -2.0, 5.0]) + k * (2.0 * normal + 0.7 * iop[3:]) for k in range(6)]
    write_series(tmp_path / "tilt", pos, iop=tuple(iop), rows=12, cols=10, spacing=(0.8, 0.6))
    with pytest.raises(InputError, match="gantry tilt"):
        read_volume(tmp_path / "tilt", strict_geometry=True)
    with caplog.at_level(logging.WARNING, logger="medseg"):
        vol = read_volume(tmp_path / "tilt")
    assert "gantry tilt of 19.29 degrees" in caplog.text and "resampled 6 slices" in caplog.text
    assert "strict-geometry" in caplog.text and vol.meta["geometry_note"] and vol.meta["sop_instance_uids"] == []
    assert vol.shape == (10, 12, 6)
    lps = LPS_TO_RAS @ vol.affine
    np.testing.assert_allclose(lps[:3, 2], 2.0 * normal, atol=1e-6)  # orthogonal grid, the slices' own step
    np.testing.assert_allclose(lps[:3, :2] @ [1, 1], 0.6 * iop[:3] + 0.8 * iop[3:], atol=1e-6)
    # every pixel of every slice, at its own IPP-derived world position, has its value in the resampled grid
    # (voxels no slice covers are NaN here, so samples that touch them are excluded; trilinear sampling of the
    # linear test pattern is exact)
    with pytest.raises(IrregularSlices) as err:
        read_volume(tmp_path / "tilt", strict_geometry=True)
    stack = err.value.geometry
    pixels = np.stack([pydicom.dcmread(f).pixel_array.T for f in stack.files], axis=-1)[None]
    arr, aff, _ = resample_irregular(pixels, stack, fill=np.nan)
    np.testing.assert_allclose(LPS_TO_RAS @ aff, vol.affine)
    np.testing.assert_allclose(np.nan_to_num(arr, nan=pixels.min()), vol.array)
    world, values = _slice_pixels_world(tmp_path / "tilt")
    sampled, inside = _sample(Volume(arr, vol.affine), world)
    ok = inside & np.isfinite(sampled)
    assert ok.sum() > 0.5 * len(values)  # most pixels of the tilted stack lie inside the regular grid
    np.testing.assert_allclose(sampled[ok], values[ok], atol=1e-3)


def test_uneven_spacing_resampled_and_cli_strict_flag(tmp_path, capsys):
    z = [0.0, 2.0, 4.0, 8.0, 10.0]  # the slice at 6 mm is missing
    write_series(tmp_path / "gap", [np.array([0.0, 0.0, v]) for v in z])
    vol = read_volume(tmp_path / "gap")
    assert vol.shape == (5, 6, 6) and vol.spacing[2] == pytest.approx(2.0)
    assert "uneven slice spacing (2 to 4 mm)" in vol.meta["geometry_note"]
    # pixel (r, c) of file slice s is 1000 s + 10 r + c: the interpolated slice at 6 mm lies halfway
    np.testing.assert_allclose(vol.array[0, :, :, 3], (vol.array[0, :, :, 2] + vol.array[0, :, :, 4]) / 2)
    np.testing.assert_allclose(vol.array[0, 1, 2, [0, 1, 2, 4, 5]], 1000 * np.arange(5) + 21)
    assert main(["convert", str(tmp_path / "gap"), str(tmp_path / "a.nii.gz"), "--strict-geometry"]) == 1
    assert "irregular slice spacing" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "gap"), str(tmp_path / "a.nii.gz")]) == 0


def test_tilt_tag_with_positions_along_the_normal_reads_unchanged(tmp_path):
    write_series(tmp_path / "tag", [np.array([0.0, 0.0, 2.0 * k]) for k in range(4)], tilt=12.0)
    with pytest.raises(InputError, match="gantry tilt"):
        read_volume(tmp_path / "tag", strict_geometry=True)
    vol = read_volume(tmp_path / "tag")
    assert vol.shape == (5, 6, 4)
    r, c = np.mgrid[:6, :5]
    for s in range(4):
        np.testing.assert_allclose(vol.array[0, :, :, s], (1000 * s + 10 * r + c).T)


def test_predict_strict_geometry_and_derived_objects_refuse_tilted_sources(tmp_path):
    from medseg.io.dicom_seg import write_dicom_seg
    from medseg.transforms.case import load_case

    pos = [np.array([0.0, 0.4 * k, 2.0 * k]) for k in range(4)]
    write_series(tmp_path / "tilt", pos)
    with pytest.raises(InputError, match="gantry tilt"):
        load_case([tmp_path / "tilt"], strict_geometry=True)
    image, _ = load_case([tmp_path / "tilt"])
    mask = image.with_array((image.array > 1500).astype(np.uint8))
    with pytest.raises(InputError, match="do not form a regular grid.*NIfTI output"):
        write_dicom_seg(mask, tmp_path / "tilt", tmp_path / "seg.dcm", {1: "a"})
    with pytest.raises(InputError, match="classic series of 4 single-frame images"):
        read_volume(tmp_path / "tilt", stack="1")
