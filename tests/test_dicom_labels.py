"""DICOM-SEG and RTSTRUCT files as training labels: names mapped to label values (case-insensitive + aliases),
DICOM-folder and CSV layouts, check-dataset reporting labels whose file lacks a mapped name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medseg.cli.main import main
from medseg.data.dicom_labels import parse_label_aliases, read_label
from medseg.data.manifest import load_manifest
from medseg.errors import ConfigError
from medseg.io import read_volume
from medseg.io.dicom_seg import write_dicom_seg
from medseg.io.rtstruct import write_rtstruct
from medseg.training.config import pipeline_from_dict
from medseg.transforms.case import load_case

CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
LABELS = {"0": "background", "1": "liver", "2": "tumour"}
ALIASES = {"tumour": ["GTV"], "liver": ["Leber"]}


def _masks(shape):
    a = np.zeros(shape, dtype=np.uint8)
    a[2:10, 3:12, 1:4] = 1  # liver
    a[5:8, 5:8, 2] = 2  # tumour inside it
    a[0:2, 0:16, :] = 3  # an extra structure ("Body"/"Couch") the data set does not declare
    return a


def _case(root: Path, name: str, kind: str, names: dict[int, str]) -> np.ndarray:
    folder = root / name
    shutil.copytree(CT5N, folder)
    image = read_volume(folder)
    arr = _masks(image.shape)
    arr[~np.isin(arr, list(names))] = 0
    writer = write_rtstruct if kind == "rtstruct" else write_dicom_seg
    writer(image.with_array(arr[None]), folder, folder / f"{kind}.dcm", names)
    return arr


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    (root / "dataset.json").write_text(json.dumps({"name": "dicomlabels", "labels": LABELS}))
    truth = {
        "a": _case(root, "a", "rtstruct", {1: "LIVER ", 2: "GTV", 3: "Body"}),  # case and blanks differ; alias
        "b": _case(root, "b", "seg", {1: "Leber", 2: "Tumour"}),  # alias; case
        "c": _case(root, "c", "rtstruct", {1: "liver"}),  # no tumour under any name
    }
    return root, truth


def test_dicom_folder_layout_maps_names_to_values(dataset):
    root, truth = dataset
    manifest = load_manifest(root, label_aliases=ALIASES)
    assert [c.case_id for c in manifest.cases] == ["a", "b", "c"] and manifest.labels == {0: "background", 1:
                                                                                          "liver", 2: "tumour"}
    for case in manifest.cases:
        assert case.label.suffix == ".dcm" and case.images == [root / case.case_id]
        image, label = load_case(case.images, case.label, case.label_names)
        expected = truth[case.case_id].copy()
        expected[expected == 3] = 0  # "Body" maps to no label: left out
        assert label.same_geometry(image)
        np.testing.assert_array_equal(label.array[0], expected)
    assert read_label(root / "a" / "rtstruct.dcm", manifest.cases[0].label_names).meta["unmapped"] == ["Body"]


def test_check_dataset_reports_label_files_lacking_a_mapped_name(dataset, tmp_path, capsys):
    root, _ = dataset
    yaml_path = tmp_path / "pipe.yaml"
    yaml_path.write_text(f"name: x\ndataset: {root}\nlabel_aliases:\n  tumour: [GTV]\n  liver: Leber\n")
    assert main(["check-dataset", str(root), "--config", str(yaml_path)]) == 1
    out = capsys.readouterr().out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "c/rtstruct.dcm" in errors[0] and "no segment/ROI named 'tumour' or 'GTV'" in errors[0]
    assert "names in the file: 'liver'" in errors[0] and "label_aliases.tumour" in errors[0]
    assert "warning:" in out and "'Body' map to no label" in out
    # without the aliases, 'GTV' and 'Leber' match nothing: cases a and b lack labels too
    assert main(["check-dataset", str(root)]) == 1
    out = capsys.readouterr().out
    assert "a/rtstruct.dcm: case a: no segment/ROI named 'tumour'" in out
    assert "b/seg.dcm: case b: no segment/ROI named 'liver'" in out


def test_csv_manifest_names_an_rtstruct_label(dataset, tmp_path):
    root, truth = dataset
    csv = root / "cases.csv"
    csv.write_text("case_id,patient_id,image,label\nfirst,p1,a,a/rtstruct.dcm\n")
    manifest = load_manifest(csv, label_aliases={"tumour": ["gtv"]})
    [case] = manifest.cases
    _, label = load_case(case.images, case.label, case.label_names)
    assert sorted(np.unique(label.array)) == [0, 1, 2]
    assert np.count_nonzero(label.array == 2) == np.count_nonzero(truth["a"] == 2)


def test_alias_table_validation(dataset):
    root, _ = dataset
    with pytest.raises(ConfigError, match="label_aliases.tumour"):
        pipeline_from_dict({"name": "x", "dataset": str(root), "label_aliases": {"tumour": [1, 2]}})
    assert pipeline_from_dict({"name": "x", "dataset": str(root), "label_aliases": ALIASES}).label_aliases == {
        "tumour": ("GTV",), "liver": ("Leber",)}
    labels = {0: "background", 1: "liver", 2: "tumour"}
    with pytest.raises(ConfigError, match="declared label name"):
        parse_label_aliases({"spleen": ["Milz"]}, labels)
    with pytest.raises(ConfigError, match="stands for one label"):
        parse_label_aliases({"liver": ["organ"], "tumour": ["Organ"]}, labels)
    with pytest.raises(ConfigError, match="declared label name"):
        load_manifest(root, label_aliases={"spleen": ["Milz"]})
