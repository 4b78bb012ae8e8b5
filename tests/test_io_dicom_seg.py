"""DICOM-SEG: write a label map referencing its source series, read it back; read dcmqi's SEG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medseg.errors import InputError
from medseg.io import read_volume
from medseg.io.dicom_seg import read_dicom_seg, write_dicom_seg

CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


def _label(img):
    lab = np.zeros((1, *img.shape), dtype=np.uint8)
    lab[0, 3:9, 4:12, 1:4] = 2
    lab[0, 10:14, 2:6, 0] = 5
    return img.with_array(lab)


def test_round_trip_references_source(tmp_path):
    img = read_volume(CT5N)
    label = _label(img)
    out = tmp_path / "seg.dcm"
    write_dicom_seg(label, CT5N, out, {2: "liver", 5: "tumour"})
    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == img.meta["series_uid"]
    refs = {item.ReferencedSOPInstanceUID for item in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == set(img.meta["sop_instance_uids"])
    back, names = read_dicom_seg(out, source_dir=CT5N)
    assert names == {1: "liver", 2: "tumour"}  # segment numbers 1..n in increasing label value
    assert back.same_geometry(img, atol=1e-4)
    np.testing.assert_array_equal(back.array, np.array([0, 0, 1, 0, 0, 2])[label.array])
    plain = read_volume(out)  # without the source: geometry from the SEG's own plane positions
    assert plain.same_geometry(img, atol=1e-4)


def test_label_off_grid_or_unnamed_values_refused(tmp_path):
    img = read_volume(CT5N)
    label = _label(img)
    shifted = label.with_array(label.array)
    shifted.affine = shifted.affine.copy()
    shifted.affine[0, 3] += 2.0
    with pytest.raises(InputError, match="not on the grid"):
        write_dicom_seg(shifted, CT5N, tmp_path / "a.dcm", {2: "liver", 5: "tumour"})
    with pytest.raises(InputError, match=r"label values \[5\] that have no name"):
        write_dicom_seg(label, CT5N, tmp_path / "b.dcm", {2: "liver"})
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_dcmqi_seg_matches_its_nrrd(shared_data):
    folder = shared_data("dicom", "dcmqi_ct3slice_with_seg")
    seg, names = read_dicom_seg(folder / "SEG_liver.dcm")
    nrrd = read_volume(folder / "liver_seg.nrrd")
    assert names == {1: "Liver"}
    assert seg.same_geometry(nrrd, atol=1e-4)
    np.testing.assert_array_equal(seg.array, nrrd.array)
    on_source, _ = read_dicom_seg(folder / "SEG_liver.dcm", source_dir=folder)
    assert on_source.same_geometry(read_volume(folder), atol=1e-4)
    np.testing.assert_array_equal(on_source.array, nrrd.array)


def test_seg_onto_series_with_empty_charset_and_no_names_logged(shared_data, tmp_path, capfd, caplog):
    """dcmqi's CT has SpecificCharacterSet '' and a one-part patient name: the SEG is written, and the name
    (which highdicom would quote in a warning) appears nowhere in the output."""
    from medseg.io.dicom import list_dicom_series

    folder = shared_data("dicom", "dcmqi_ct3slice_with_seg")
    series = next(s for s in list_dicom_series(folder) if s.is_image)
    src = read_volume(folder, series_uid=series.uid)
    name = str(pydicom.dcmread(series.files[0], stop_before_pixels=True).PatientName)
    label = np.zeros((1, *src.shape), np.uint8)
    label[0, 100:200, 120:220, 1] = 1
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_dicom_seg(src.with_array(label), folder, tmp_path / "seg.dcm", {1: "liver"})
    seg, labels = read_dicom_seg(tmp_path / "seg.dcm")
    assert labels == {1: "liver"} and seg.same_geometry(src, atol=1e-3)
    np.testing.assert_array_equal(seg.array, label)
    out = capfd.readouterr()
    said = out.out + out.err + caplog.text + " ".join(str(w.message) for w in caught)
    assert name and name not in said


def test_segment_colours_and_codes(tmp_path):
    import highdicom as hd

    from medseg.errors import ConfigError
    from medseg.io.label_style import GENERIC_CONCEPT, PALETTE

    img = read_volume(CT5N)
    out = tmp_path / "seg.dcm"
    codes = {"2": {"type": ["10200004", "SCT", "Liver"], "category": {"value": "123037004", "scheme": "SCT",
                                                                      "meaning": "Anatomical Structure"}}}
    write_dicom_seg(_label(img), CT5N, out, {2: "liver", 5: "tumour"}, colors={2: [200, 30, 40]}, codes=codes)
    liver, tumour = pydicom.dcmread(out).SegmentSequence
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"
    assert tumour.SegmentedPropertyTypeCodeSequence[0].CodeValue == GENERIC_CONCEPT.value  # generic code
    rgb = [hd.color.CIELabColor.from_dicom_value(s.RecommendedDisplayCIELabValue).to_rgb() for s in (liver, tumour)]
    assert [tuple(int(v) for v in c) for c in rgb] == [(200, 30, 40), PALETTE[1]]  # tumour: 2nd palette colour
    with pytest.raises(ConfigError, match="colors"):
        write_dicom_seg(_label(img), CT5N, out, {2: "liver", 5: "tumour"}, colors={2: [300, 0, 0]})
