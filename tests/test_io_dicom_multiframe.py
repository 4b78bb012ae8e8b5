"""Enhanced multi-frame DICOM: same volume and geometry as the classic series it was built from; stacks/dimensions."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from test_io_dicom import oblique_iop, write_series

from medseg.cli.main import main
from medseg.errors import InputError
from medseg.io import read_volume
from medseg.io.dicom import list_dicom_series
from medseg.io.dicom_multiframe import list_stacks
from medseg.io.volume import LPS_TO_RAS


def _enhanced(series_dir, out_path):
    import highdicom as hd

    dss = [pydicom.dcmread(f) for f in sorted(series_dir.iterdir()) if f.is_file()]
    mf = hd.legacy.LegacyConvertedEnhancedMRImage(dss, series_instance_uid=hd.UID(), series_number=99,
                                                  sop_instance_uid=hd.UID(), instance_number=1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    mf.save_as(out_path)
    return out_path


@pytest.mark.parametrize("name", ["11_HCropVolume", "11-T1post-18670"])  # axial 1 mm crop; oblique 6.5 mm series
def test_enhanced_from_classic_series_matches_sitk(shared_data, tmp_path, name):
    classic = shared_data("dicom", "tcia_pgbm003", name)
    mf = _enhanced(classic, tmp_path / "mf" / "enhanced.dcm")
    [info] = list_dicom_series(tmp_path / "mf")
    assert info.num_slices == pydicom.dcmread(mf, stop_before_pixels=True).NumberOfFrames > 1
    vol = read_volume(tmp_path / "mf")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(classic)))
    ref = reader.Execute()
    np.testing.assert_array_equal(vol.array[0], sitk.GetArrayFromImage(ref).T)
    lps = LPS_TO_RAS @ vol.affine
    np.testing.assert_allclose(lps[:3, 3], ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(vol.spacing, ref.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(lps[:3, :3] / vol.spacing, np.reshape(ref.GetDirection(), (3, 3)), atol=1e-4)
    assert vol.meta["stack"] == "1" and vol.meta["modality"] == "MR"


def test_two_echoes_listed_and_selectable(tmp_path, capsys):
    pos = [np.array([1.0, 2.0, 3.0]) + 2.5 * k * np.cross(oblique_iop()[:3], oblique_iop()[3:]) for k in range(4)]
    write_series(tmp_path / "classic", pos + pos, iop=tuple(oblique_iop()))  # files 4..7: second echo
    mf = _enhanced(tmp_path / "classic", tmp_path / "mf.dcm")
    ds = pydicom.dcmread(mf)
    # highdicom indexes frames at repeated positions by the legacy InstanceNumber (a dimension unique per frame,
    # which orders frames and must not split them); add the echo as a scanner would: functional group + dimension
    pointer = Dataset()
    pointer.DimensionIndexPointer = pydicom.tag.Tag("EffectiveEchoTime")
    pointer.FunctionalGroupPointer = pydicom.tag.Tag("MREchoSequence")
    pointer.DimensionDescriptionLabel = "Echo"
    ds.DimensionIndexSequence.append(pointer)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        instance = int(frame.UnassignedPerFrameConvertedAttributesSequence[0].InstanceNumber)
        echo = Dataset()
        echo.EffectiveEchoTime = 10.0 if instance <= 4 else 25.0
        frame.MREchoSequence = Sequence([echo])
        content = frame.FrameContentSequence[0]
        content.DimensionIndexValues = [int(content.DimensionIndexValues), 1 if instance <= 4 else 2]
    ds.save_as(mf)
    stacks = list_stacks(mf)
    assert [(s.id, s.description, len(s.frames)) for s in stacks] == [
        ("1", "EffectiveEchoTime 10, Echo 1", 4), ("2", "EffectiveEchoTime 25, Echo 2", 4)]
    with pytest.raises(InputError, match="holds 2 stacks.*EffectiveEchoTime 25, Echo 2\\): 4 frames.*--stack"):
        read_volume(mf)
    for sid, first_slice in (("1", 0), ("EffectiveEchoTime 25, Echo 2", 4)):
        vol = read_volume(mf, stack=sid)
        r, c = np.mgrid[:6, :5]
        for k in range(4):  # pixel (r, c) of file slice s holds 1000 s + 10 r + c
            np.testing.assert_array_equal(vol.array[0, :, :, k], (1000 * (first_slice + k) + 10 * r + c).T)
        np.testing.assert_allclose(LPS_TO_RAS @ vol.affine @ [0, 0, 0, 1], [*pos[0], 1], atol=1e-4)
        np.testing.assert_allclose(vol.spacing, (0.6, 0.8, 2.5), atol=1e-5)
    with pytest.raises(InputError, match="has no stack '3'"):
        read_volume(mf, stack="3")
    capsys.readouterr()
    assert main(["info", str(mf)]) == 0
    text = capsys.readouterr().out
    assert "stack 1  EffectiveEchoTime 10, Echo 1  4 frames" in text and "stack 2  EffectiveEchoTime 25" in text
    assert "2 stacks: pass --stack ID" in text and "shape" not in text
    assert main(["info", str(mf), "--stack", "2"]) == 0
    assert "shape        5 x 6 x 4" in capsys.readouterr().out
    out = tmp_path / "echo2.nii.gz"
    assert main(["convert", str(mf), str(out), "--stack", "2"]) == 0
    assert main(["convert", str(mf), str(out), "--overwrite"]) == 1
    assert "--stack" in capsys.readouterr().err
