"""RTSTRUCT: contours rasterised onto the referenced series (even-odd holes, slices matched by position), written
back from label maps, and read again to the same mask."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.sequence import Sequence

from medseg.cli.main import main
from medseg.errors import InputError
from medseg.io import read_volume
from medseg.io.rtstruct import mask_contours, read_rois, read_rtstruct, read_rtstruct_masks, write_rtstruct
from medseg.io.volume import Volume

CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
RT_SAMPLE = ("dicom", "rtutils_ct2slice_with_rtstruct")


def _dice(a, b):
    return 2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def test_shared_sample_read_write_read_is_the_same_mask(shared_data, tmp_path):
    folder = shared_data(*RT_SAMPLE)
    label, names = read_rtstruct(folder / "RTSTRUCT_rt.dcm", folder)  # the folder holds the RTSTRUCT itself
    image = read_volume(folder)
    assert names == {1: "ROI-1"} and label.same_geometry(image) and label.meta["series_uid"] == image.meta["series_uid"]
    # the sample is a 24 mm square with a 14 mm square hole on the first slice (z = 60 mm): even-odd rule
    ijk = np.linalg.inv(image.affine)
    lps_to_ij = lambda x, y: np.rint(ijk[:2] @ [-x, -y, 60.0, 1]).astype(int)  # noqa: E731
    ring = label.array[0, :, :, 0]
    assert ring[tuple(lps_to_ij(-39.0, -49.0))] == 1 and ring[tuple(lps_to_ij(-39.0, -39.0))] == 0  # rim, hole
    assert np.count_nonzero(ring) == 1443 and not label.array[0, :, :, 1].any()
    out = tmp_path / "rt.dcm"
    write_rtstruct(label, folder, out, names)
    back, back_names = read_rtstruct(out, folder)
    assert back_names == names
    np.testing.assert_array_equal(back.array, label.array)
    ds = pydicom.dcmread(out)
    ref = ds.ReferencedFrameOfReferenceSequence[0]
    src = pydicom.dcmread(folder / "ct_1.dcm", stop_before_pixels=True)
    assert ref.FrameOfReferenceUID == src.FrameOfReferenceUID == ds.FrameOfReferenceUID
    assert ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.SeriesInstanceUID != src.SeriesInstanceUID


def test_cli_convert_rtstruct_to_nifti(shared_data, tmp_path, capsys):
    folder = shared_data(*RT_SAMPLE)
    out = tmp_path / "mask.nii.gz"
    assert main(["convert", str(folder / "RTSTRUCT_rt.dcm"), str(out), "--source", str(folder)]) == 0
    assert "1=ROI-1" in capsys.readouterr().out
    mask, image = read_volume(out), read_volume(folder)
    assert mask.same_geometry(image) and int(mask.array.sum()) == 1443


def _labels_on_ct5n():
    image = read_volume(CT5N)
    label = np.zeros(image.shape, dtype=np.uint8)
    ii, jj = np.mgrid[:16, :16]
    label[(ii - 7.3) ** 2 + (jj - 8.1) ** 2 < 30, 1:4] = 2  # disc on 3 slices ...
    label[6:9, 7:10, 2] = 0  # ... with a hole on the middle one
    label[7, 8, 2] = 2  # and an island inside the hole
    label[1:4, 11:15, 0:2] = 5
    label[14, 1, 4] = 5  # one pixel
    label[12, 3, 4] = 5  # and a diagonal neighbour: two contours
    label[13, 2, 4] = 5
    return image, image.with_array(label[None])


def test_write_read_recovers_mask_with_holes_islands_and_slices_matched_by_position(tmp_path, caplog):
    image, label = _labels_on_ct5n()
    out = tmp_path / "rt.dcm"
    write_rtstruct(label, CT5N, out, {2: "liver", 5: "Tumour"}, colors={5: [10, 20, 30]},
                   codes={2: {"type": ["10200004", "SCT", "Liver"]}})
    ds = pydicom.dcmread(out)
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["liver", "Tumour"]
    assert list(ds.ROIContourSequence[1].ROIDisplayColor) == [10, 20, 30]
    code = ds.RTROIObservationsSequence[0].RTROIIdentificationCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("10200004", "SCT", "Liver")
    assert ds.RTROIObservationsSequence[1].RTROIIdentificationCodeSequence[0].CodeMeaning == "Tissue"
    # shuffle the contours and drop their image references: slices must be found from the positions alone
    for rc in ds.ROIContourSequence:
        items = list(rc.ContourSequence)[::-1]
        for c in items:
            del c.ContourImageSequence
        rc.ContourSequence = Sequence(items)
    ds.save_as(out)
    masks, source = read_rtstruct_masks(out, CT5N)
    assert list(masks) == ["liver", "Tumour"] and source.shape == image.shape
    for name, value in (("liver", 2), ("Tumour", 5)):
        truth = label.array[0] == value
        assert _dice(masks[name], truth) == 1.0, name
    back, names = read_rtstruct(out, CT5N)
    assert names == {1: "liver", 2: "Tumour"}
    np.testing.assert_array_equal(back.array[0] == 1, label.array[0] == 2)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        read_rtstruct(out, CT5N)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # nothing skipped, no overlap


def test_contours_between_slices_are_reported_not_guessed(tmp_path, caplog):
    image, label = _labels_on_ct5n()
    out = tmp_path / "rt.dcm"
    write_rtstruct(label, CT5N, out, {2: "a", 5: "b"})
    ds = pydicom.dcmread(out)
    contours = ds.ROIContourSequence[0].ContourSequence
    half_step = image.spacing[2] / 2
    moved = contours[0]
    pts = np.array(moved.ContourData, dtype=float).reshape(-1, 3)
    assert np.allclose(image.direction[:, 2], [0, 0, 1])  # CT5N is axial: z is the slice normal
    pts[:, 2] += half_step  # halfway between two slices
    moved.ContourData = [f"{v:.4f}" for v in pts.ravel()]
    ds.save_as(out)
    with caplog.at_level(logging.WARNING):
        masks, _ = read_rtstruct_masks(out, CT5N)
    assert "1 contour(s) between or outside the slices" in caplog.text
    assert _dice(masks["a"], label.array[0] == 2) < 1.0


def test_mask_contours_are_exact_under_even_odd_filling():
    from skimage.draw import polygon

    rng = np.random.default_rng(0)
    mask = rng.random((23, 17)) > 0.55  # a noisy mask: many touching diagonals, holes and islands
    back = np.zeros_like(mask)
    for poly in mask_contours(mask):
        fill = np.zeros_like(mask)
        fill[polygon(poly[:, 0], poly[:, 1], mask.shape)] = True
        back ^= fill
    np.testing.assert_array_equal(back, mask)


def test_refusals(tmp_path, shared_data):
    image, label = _labels_on_ct5n()
    with pytest.raises(InputError, match="no name"):
        write_rtstruct(label, CT5N, tmp_path / "a.dcm", {2: "liver"})
    with pytest.raises(InputError, match="not on the grid"):
        write_rtstruct(Volume(label.array[:, :8], label.affine), CT5N, tmp_path / "a.dcm", {2: "a", 5: "b"})
    with pytest.raises(InputError, match="not an RT Structure Set"):
        read_rois(next(CT5N.iterdir()))
    folder = shared_data(*RT_SAMPLE)
    with pytest.raises(InputError, match="has no series with UID"):  # the referenced series is not in CT5N
        read_rtstruct(folder / "RTSTRUCT_rt.dcm", CT5N)


def test_tilted_series_contours_lie_on_each_slice_and_read_back(tmp_path):
    from test_io_dicom import write_series

    pos = [np.array([0.0, 0.9 * k, 3.0 * k]) for k in range(8)]  # 16.7 degrees of gantry tilt
    folder = tmp_path / "tilt"
    write_series(folder, pos, rows=40, cols=36, spacing=(0.7, 0.7))
    frame = pydicom.uid.generate_uid()
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.FrameOfReferenceUID = frame
        ds.save_as(f)
    image = read_volume(folder)  # resampled onto a regular grid
    assert image.meta["geometry_note"]
    ii, jj, kk = np.meshgrid(*(np.arange(n) for n in image.shape), indexing="ij")
    blob = ((ii - 17) ** 2 + (jj - 22) ** 2 < 64) & (kk >= 2) & (kk <= 5)
    label = image.with_array(blob[None].astype(np.uint8))
    out = tmp_path / "rt.dcm"
    write_rtstruct(label, folder, out, {1: "blob"})
    with pytest.raises(InputError, match="gantry tilt"):
        read_rtstruct(out, folder, strict_geometry=True)
    ds = pydicom.dcmread(out)
    normal, slice_dists = np.array([0.0, 0.0, 1.0]), {round(3.0 * k, 3) for k in range(8)}
    for c in ds.ROIContourSequence[0].ContourSequence:  # every contour on the plane of the slice it references
        pts = np.array(c.ContourData, dtype=float).reshape(-1, 3)
        assert np.ptp(pts @ normal) < 1e-3 and round(float(pts[0] @ normal), 3) in slice_dists
    back, _ = read_rtstruct(out, folder)
    assert back.same_geometry(image)
    assert _dice(back.array[0] == 1, blob) >= 0.98  # nearest-neighbour out, linear back (1.0 measured here)
