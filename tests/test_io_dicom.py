"""DICOM series: geometry agrees with SimpleITK and with an independent pydicom IPP/IOP computation; refusals."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medseg.cli.main import main
from medseg.errors import InputError
from medseg.io import read_volume
from medseg.io.dicom import list_dicom_series
from medseg.io.volume import LPS_TO_RAS

PYDICOM_DIRS = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"


# ----------------------------------------------------------------------------------------------- helpers
def write_series(folder: Path, positions, iop=(1, 0, 0, 0, 1, 0), *, rows=6, cols=5, spacing=(0.8, 0.6),
                 series_uid=None, description="synthetic", tilt=None, iops=None) -> str:
    """Write a synthetic single-frame MR series; pixel (row r, col c) of slice s holds 1000*s + 10*r + c.

    Files are named in reverse slice order so that reading must sort by position, not by name.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    for s, pos in enumerate(positions):
        meta = FileMetaDataset()
        sop = generate_uid()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / "x"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, "1.2.3.4"
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "MR", description, 1, s + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (iops[s] if iops else iop)]
        ds.PixelSpacing = [f"{v}" for v in spacing]
        ds.SliceThickness = "2.0"
        if tilt is not None:
            ds.GantryDetectorTilt = str(tilt)
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        r, c = np.mgrid[:rows, :cols]
        ds.PixelData = (1000 * s + 10 * r + c).astype(np.int16).tobytes()
        ds.save_as(folder / f"im{len(positions) - s:03d}.dcm", enforce_file_format=True)
    return series_uid


def oblique_iop():
    row = np.array([0.9, 0.3, 0.1])
    row /= np.linalg.norm(row)
    col = np.cross(np.array([0.1, -0.2, 1.0]), row)
    col /= np.linalg.norm(col)
    return np.concatenate([row, col])


def independent_affine(files) -> np.ndarray:
    """LPS affine from pydicom tags alone, using the first-to-last position vector for the slice axis."""
    dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iop = np.array(dss[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    dss.sort(key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, dtype=float))))
    first, last = (np.array(d.ImagePositionPatient, dtype=float) for d in (dss[0], dss[-1]))
    dr, dc = (float(v) for v in dss[0].PixelSpacing)
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1] = iop[:3] * dc, iop[3:] * dr
    aff[:3, 2] = (last - first) / (len(dss) - 1)
    aff[:3, 3] = first
    return aff


def check_against_sitk_and_pydicom(folder: Path, vol) -> None:
    uid = vol.meta["series_uid"]
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid, recursive=True)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    img = reader.Execute()
    lps = LPS_TO_RAS @ vol.affine
    np.testing.assert_allclose(vol.spacing, img.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(lps[:3, 3], img.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(LPS_TO_RAS[:3, :3] @ vol.direction, np.reshape(img.GetDirection(), (3, 3)), atol=1e-5)
    np.testing.assert_array_equal(vol.array[0], sitk.GetArrayFromImage(img).transpose(2, 1, 0))
    if len(files) > 1:
        np.testing.assert_allclose(lps, independent_affine(files), atol=1e-3)


# ------------------------------------------------------------------------------- synthetic series
@pytest.mark.parametrize("case", ["axial_square", "oblique_nonsquare_gap", "descending_positions"])
def test_synthetic_series_geometry_and_voxel_order(tmp_path, case):
    if case == "axial_square":
        iop, spacing, step = np.array([1, 0, 0, 0, 1, 0.0]), (0.7, 0.7), 2.0
    elif case == "oblique_nonsquare_gap":  # 2 mm thick slices 6.5 mm apart, non-square pixels
        iop, spacing, step = oblique_iop(), (0.8, 0.55), 6.5
    else:
        iop, spacing, step = np.array([0, 1, 0, 0, 0, -1.0]), (1.1, 0.9), -3.0
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array([-30.5, 12.25, 80.0])
    positions = [origin + k * step * normal for k in range(4)]
    write_series(tmp_path / "s", positions, iop, spacing=spacing)
    vol = read_volume(tmp_path / "s")
    assert vol.shape == (5, 6, 4) and vol.spatial_dims == 3
    np.testing.assert_allclose(vol.spacing, (spacing[1], spacing[0], abs(step)), atol=1e-5)
    # voxel (i=column, j=row, k=slice along the normal) holds 1000*s + 10*row + column of its source slice
    s_of_k = list(range(4)) if step > 0 else list(range(3, -1, -1))
    assert vol.array[0, 3, 2, 1] == 1000 * s_of_k[1] + 10 * 2 + 3
    lps = LPS_TO_RAS @ vol.affine
    first = positions[s_of_k[0]]
    np.testing.assert_allclose(lps[:3, 3], first, atol=1e-4)
    np.testing.assert_allclose(lps[:3, 0], iop[:3] * spacing[1], atol=1e-6)
    assert len(vol.meta["sop_instance_uids"]) == 4 and len(vol.meta["source_files"]) == 4
    check_against_sitk_and_pydicom(tmp_path / "s", vol)


def test_one_slice_series_is_accepted(tmp_path):
    write_series(tmp_path / "one", [np.array([1.0, 2.0, 3.0])])
    vol = read_volume(tmp_path / "one")
    assert vol.shape == (5, 6, 1)
    assert vol.spacing[2] == pytest.approx(2.0)  # SliceThickness when there is no second slice
    np.testing.assert_allclose(LPS_TO_RAS @ vol.affine @ [0, 0, 0, 1], [1, 2, 3, 1])


@pytest.mark.parametrize("fault,message", [
    ("gantry_tilt", "gantry tilt"),
    ("tilt_tag", "gantry tilt"),
    ("missing_slice", "irregular slice spacing"),
    ("inconsistent_iop", "inconsistent in-plane geometry"),
    ("duplicate_position", "same slice position"),
])
def test_refused_geometry(tmp_path, fault, message):
    z = [np.array([0.0, 0.0, 2.0 * k]) for k in range(5)]
    kwargs = {}
    if fault == "gantry_tilt":
        z = [np.array([0.0, 0.3 * k, 2.0 * k]) for k in range(5)]  # y shifts with z: tilted gantry
    elif fault == "tilt_tag":
        kwargs["tilt"] = 12.0
    elif fault == "missing_slice":
        del z[2]
    elif fault == "inconsistent_iop":
        kwargs["iops"] = [(1, 0, 0, 0, 1, 0)] * 4 + [(0.99, 0.141, 0, -0.141, 0.99, 0)]
    elif fault == "duplicate_position":
        z[3] = z[2]
    write_series(tmp_path / "bad", z, **kwargs)
    with pytest.raises(InputError, match=message) as err:  # tilt and spacing: refused only when strict
        read_volume(tmp_path / "bad", strict_geometry=True)
    assert str(tmp_path / "bad") in str(err.value) and "\n" not in str(err.value)


def test_several_series_listed_and_selectable(tmp_path):
    a = write_series(tmp_path / "two" / "a", [np.array([0, 0, 2.0 * k]) for k in range(3)], description="T1")
    b = write_series(tmp_path / "two" / "b", [np.array([0, 0, 2.0 * k]) for k in range(5)], description="FLAIR")
    with pytest.raises(InputError) as err:
        read_volume(tmp_path / "two")
    msg = str(err.value)
    assert a in msg and b in msg and "'T1'" in msg and "5 slices" in msg and "--series" in msg
    assert read_volume(tmp_path / "two", series_uid=b).shape == (5, 6, 5)
    with pytest.raises(InputError, match="no series with UID 9.9"):
        read_volume(tmp_path / "two", series_uid="9.9")


# ------------------------------------------------------------------------------- pydicom's own series
def test_pydicom_ct_series_geometry():
    folder = PYDICOM_DIRS / "98892001" / "CT5N"
    vol = read_volume(folder)
    assert vol.shape == (16, 16, 5) and vol.meta["modality"] == "CT"
    np.testing.assert_allclose(vol.spacing, (0.488281, 0.488281, 2.5), atol=1e-6)
    check_against_sitk_and_pydicom(folder, vol)


@pytest.mark.parametrize("folder,message", [
    ("77654033/CT2", "irregular slice spacing"),        # 4 CT slices with a 200 mm hole (strict)
    ("98892001/CT2N", "inconsistent in-plane geometry"),  # two localizers in different planes
    ("98892003/MR700", "inconsistent in-plane geometry"),  # radial slices: each its own orientation
    ("98892003/MR1", "contains 3 image series"),
])
def test_pydicom_series_refused(folder, message):
    with pytest.raises(InputError, match=message):
        read_volume(PYDICOM_DIRS / folder, strict_geometry=True)


def test_non_image_objects_are_listed_not_read(shared_data):
    folder = shared_data("dicom", "dcmqi_ct3slice_with_seg")
    series = list_dicom_series(folder)
    assert [s.is_image for s in series] == [True, False]
    assert series[1].modality == "SEG" and series[1].kind == "Segmentation Storage"
    assert read_volume(folder).shape == (512, 512, 3)  # the SEG does not count as a second series
    rt = list_dicom_series(shared_data("dicom", "rtutils_ct2slice_with_rtstruct"))
    assert sorted((s.modality, s.is_image) for s in rt) == [("CT", True), ("RTSTRUCT", False)]


# ------------------------------------------------------------------------------- every series in ../shared
SHARED_SERIES = [
    "dcm_qa_decubitus_t1sag/HFS", "dcm_qa_decubitus_t1sag/HFP", "dcm_qa_decubitus_t1sag/HFDL",
    "dcm_qa_decubitus_t1sag/HFDR", "tcia_pgbm003/11-T1post-18670", "tcia_pgbm003/26401-T1prereg-52906",
    "tcia_pgbm003/36468-FLAIRreg-58706", "tcia_pgbm003/37830-T2reg-78532", "tcia_pgbm003/11_HCropVolume",
    "dcmqi_ct3slice_with_seg", "rtutils_ct2slice_with_rtstruct",
]


def test_shared_series_list_is_complete(shared_data):
    root = shared_data("dicom")
    found = {str(s.files[0].parent.relative_to(root)) for s in list_dicom_series(root) if s.is_image}
    assert found == set(SHARED_SERIES)


@pytest.mark.parametrize("name", SHARED_SERIES)
def test_shared_series_geometry_and_convert(shared_data, tmp_path, name, capsys):
    folder = shared_data("dicom", *name.split("/"))
    vol = read_volume(folder)
    check_against_sitk_and_pydicom(folder, vol)
    out = tmp_path / "series.nii.gz"
    assert main(["convert", str(folder), str(out)]) == 0
    lps = LPS_TO_RAS @ vol.affine
    img = sitk.ReadImage(str(out))
    np.testing.assert_allclose(img.GetOrigin(), lps[:3, 3], atol=1e-4)
    np.testing.assert_allclose(img.GetSpacing(), vol.spacing, atol=1e-4)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), LPS_TO_RAS[:3, :3] @ vol.direction, atol=1e-4)
    np.testing.assert_allclose(nib.load(out).affine, vol.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(nib.load(out).dataobj), vol.array[0])


def test_single_file_and_multiframe(tmp_path):
    ct = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
    vol = read_volume(ct)
    img = sitk.ReadImage(str(ct))
    assert vol.shape == (128, 128, 1)
    np.testing.assert_allclose(LPS_TO_RAS @ vol.affine @ [0, 0, 0, 1], [*img.GetOrigin(), 1], atol=1e-4)
    np.testing.assert_allclose(vol.spacing[:2], img.GetSpacing()[:2], atol=1e-6)
    np.testing.assert_array_equal(vol.array[0, :, :, 0], sitk.GetArrayFromImage(img)[0].T)
    write_series(tmp_path / "mf", [np.zeros(3)])
    path = next((tmp_path / "mf").iterdir())
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData * 3
    ds.save_as(path)
    with pytest.raises(InputError, match="multi-frame"):
        read_volume(tmp_path / "mf")
