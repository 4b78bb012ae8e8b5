"""medseg.data.manifest: discovery from MSD, nnU-Net v2, images/+labels/ and CSV layouts; patient ids."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.manifest import Case, Manifest, load_manifest, split_ending, write_manifest_csv
from medseg.errors import ConfigError, InputError


def _nii(path: Path, shape=(6, 5, 4), value=0, dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full(shape, value, dtype=dtype), np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    return path


def _msd(root: Path, ids=("a", "b", "c")) -> Path:
    training = []
    for cid in ids:
        _nii(root / "imagesTr" / f"{cid}.nii.gz", dtype=np.float32)
        _nii(root / "labelsTr" / f"{cid}.nii.gz", value=1)
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
    meta = {"name": "Toy", "tensorImageSize": "3D", "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "organ"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_msd_layout(tmp_path, caplog):
    root = _msd(tmp_path / "ds")
    with caplog.at_level(logging.INFO, logger="medseg"):
        man = load_manifest(root)
    assert [c.case_id for c in man.cases] == ["a", "b", "c"]
    assert man.labels == {0: "background", 1: "organ"}
    assert man.channel_names == {0: "CT"}
    assert man.spatial_dims == 3 and man.name == "Toy" and man.problems == []
    assert man.cases[0].images == [root / "imagesTr" / "a.nii.gz"]
    assert man.cases[0].label == root / "labelsTr" / "a.nii.gz"
    assert [c.patient_id for c in man.cases] == ["a", "b", "c"]
    assert "patient id from the case id" in caplog.text


def test_msd_unlisted_and_missing_files_are_problems(tmp_path):
    root = _msd(tmp_path / "ds")
    _nii(root / "imagesTr" / "extra.nii.gz")
    (root / "labelsTr" / "b.nii.gz").unlink()
    man = load_manifest(root)
    text = "\n".join(man.problems)
    assert len(man.problems) == 2
    assert "extra.nii.gz: image not listed in dataset.json" in text
    assert "labelsTr/b.nii.gz: listed for case b in dataset.json but missing" in text


def test_nnunet_v2_layout_multichannel(tmp_path):
    root = tmp_path / "Dataset001_Toy"
    for cid in ("x1", "x2"):
        for ch in (0, 1):
            _nii(root / "imagesTr" / f"{cid}_{ch:04d}.nii.gz")
        _nii(root / "labelsTr" / f"{cid}.nii.gz")
    _nii(root / "imagesTr" / "x3_0000.nii.gz")  # lacks channel 1
    _nii(root / "labelsTr" / "x9.nii.gz")  # no image
    meta = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "tumour": 1, "edema": 2},
            "numTraining": 2, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    man = load_manifest(root)
    assert [c.case_id for c in man.cases] == ["x1", "x2"]
    assert man.cases[0].images == [root / "imagesTr" / "x1_0000.nii.gz", root / "imagesTr" / "x1_0001.nii.gz"]
    assert man.labels == {0: "background", 1: "tumour", 2: "edema"}
    assert man.channel_names == {0: "T1", 1: "T2"}
    assert len(man.problems) == 2
    assert any("case x3 lacks channel(s) [1]" in p for p in man.problems)
    assert any(p.startswith(str(root / "labelsTr" / "x9.nii.gz")) and "unpaired label" in p for p in man.problems)


def test_nnunet_region_labels_need_a_class_order(tmp_path):
    """Region labels are read (tests/test_regions.py); without regions_class_order they are refused."""
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    meta = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "whole": [1, 2]}, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="regions_class_order"):
        load_manifest(root)


def test_images_labels_layout_unpaired(tmp_path):
    root = tmp_path / "plain"
    for cid in ("p1", "p2"):
        _nii(root / "images" / f"{cid}.nii.gz")
        _nii(root / "labels" / f"{cid}.nii.gz")
    _nii(root / "images" / "lonely.nii.gz")
    _nii(root / "labels" / "orphan.nii.gz")
    (root / "images" / "notes.txt").write_text("not an image")
    man = load_manifest(root)
    assert [c.case_id for c in man.cases] == ["lonely", "p1", "p2"]
    assert man.case("lonely").label is None
    assert len(man.problems) == 2
    assert man.problems[0].startswith(str(root / "images" / "lonely.nii.gz"))
    assert "unpaired image" in man.problems[0]
    assert man.problems[1].startswith(str(root / "labels" / "orphan.nii.gz"))
    assert "unpaired label" in man.problems[1]


def test_images_only_folder_is_unlabelled_without_problems(tmp_path):
    _nii(tmp_path / "ds" / "images" / "q.nii.gz")
    man = load_manifest(tmp_path / "ds")
    assert man.cases[0].label is None and man.problems == []


def test_csv_manifest_with_patients_and_channels(tmp_path):
    root = tmp_path / "csvds"
    for name in ("a0.nii.gz", "a1.nii.gz", "b0.nii.gz", "b1.nii.gz", "la.nii.gz", "lb.nii.gz"):
        _nii(root / "files" / name)
    (root / "m.csv").write_text(
        "case_id,patient_id,image,image_1,label\n"
        "A,P7,files/a0.nii.gz,files/a1.nii.gz,files/la.nii.gz\n"
        "B,P7,files/b0.nii.gz,files/b1.nii.gz,files/lb.nii.gz\n"
        "C,P8,files/b0.nii.gz,files/missing.nii.gz,\n"
    )
    (root / "dataset.json").write_text(json.dumps({"name": "CsvToy", "labels": {"0": "bg", "1": "fg"},
                                                   "modality": {"0": "T1", "1": "T2"}}))
    man = load_manifest(root / "m.csv", patient_regex="^(x)")  # regex ignored: the CSV names patients
    assert man.patients() == {"P7": ["A", "B"], "P8": ["C"]}
    assert man.case("A").images == [root / "files/a0.nii.gz", root / "files/a1.nii.gz"]
    assert man.case("C").label is None
    assert man.labels == {0: "bg", 1: "fg"} and man.name == "CsvToy"
    assert len(man.problems) == 1 and "missing.nii.gz: listed for case C" in man.problems[0]


def test_folder_with_manifest_csv_uses_it(tmp_path):
    root = _msd(tmp_path / "ds")
    (root / "manifest.csv").write_text(
        "case_id,patient_id,image,label\n"
        + "".join(f"{c},{p},imagesTr/{c}.nii.gz,labelsTr/{c}.nii.gz\n" for c, p in (("a", "1"), ("b", "1"), ("c", "2"))))
    man = load_manifest(root)
    assert man.patients() == {"1": ["a", "b"], "2": ["c"]}
    assert man.labels == {0: "background", 1: "organ"}


@pytest.mark.parametrize("content, match", [
    ("case_id,patient_id,label\nA,P,x.nii.gz\n", "has columns"),
    ("", "has columns"),
    ("case_id,patient_id,image,label\nA,P,x.nii.gz,\nA,P,y.nii.gz,\n", "repeats case_id 'A'"),
    ("case_id,patient_id,image,label\n,P,x.nii.gz,\n", "empty case_id"),
])
def test_bad_csv(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=match) as err:
        load_manifest(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_patient_regex_groups_hc18_names(tmp_path):
    root = tmp_path / "hc"
    for name in ("010_HC", "010_2HC", "011_HC", "014_HC", "014_2HC", "014_3HC"):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "images" / f"{name}.png").write_bytes(b"")
        (root / "labels").mkdir(exist_ok=True)
        (root / "labels" / f"{name}.png").write_bytes(b"")
    man = load_manifest(root, patient_regex=r"^(\d+)_")
    assert man.patients() == {"010": ["010_2HC", "010_HC"], "011": ["011_HC"],
                              "014": ["014_2HC", "014_3HC", "014_HC"]}
    assert man.spatial_dims == 2
    with pytest.raises(InputError, match="does not match --patient-regex"):
        load_manifest(root, patient_regex=r"^subject(\d+)")
    with pytest.raises(ConfigError, match="--patient-regex"):
        load_manifest(root, patient_regex=r"(unclosed")


def test_dicom_patient_id_is_a_digest_never_the_identifier(tmp_path, caplog):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    src = Path(get_testdata_file("CT_small.dcm"))
    raw_id = str(pydicom.dcmread(src, stop_before_pixels=True).PatientID)
    rows = ["case_id,image,label"]
    for cid in ("scan1", "scan2"):
        (tmp_path / cid).mkdir()
        shutil.copy(src, tmp_path / cid / "1.dcm")
        rows.append(f"{cid},{cid},")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.DEBUG, logger="medseg"):
        man = load_manifest(tmp_path / "m.csv")
    pids = {c.patient_id for c in man.cases}
    assert len(pids) == 1, "two scans of one DICOM patient must share a patient id"
    pid = pids.pop()
    assert pid.startswith("dicom-") and raw_id not in pid
    assert raw_id not in caplog.text and "DICOM PatientID" in caplog.text


def test_hash_is_stable_across_locations_and_sensitive_to_patients(tmp_path):
    root = _msd(tmp_path / "one")
    h1 = load_manifest(root).hash()
    shutil.copytree(root, tmp_path / "two")
    assert load_manifest(tmp_path / "two").hash() == h1
    man = load_manifest(root)
    man.cases[0].patient_id = "someone-else"
    assert man.hash() != h1
    assert len(h1) == 64


def test_write_manifest_csv_round_trip(tmp_path):
    root = _msd(tmp_path / "ds")
    man = load_manifest(root)
    man.cases[1].patient_id = "a"
    write_manifest_csv(man, root / "copy.csv")
    again = load_manifest(root / "copy.csv")
    assert [(c.case_id, c.patient_id, c.images, c.label) for c in again.cases] == \
        [(c.case_id, c.patient_id, c.images, c.label) for c in man.cases]
    assert again.hash() == man.hash()


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "absent", "does not exist"),
    (lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", "not a CSV manifest"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "not a known data set layout"),
    (lambda p: (p / "j").mkdir() or (p / "j" / "dataset.json").write_text("{oops") and p / "j", "not valid JSON"),
    (lambda p: (p / "k").mkdir() or (p / "k" / "dataset.json").write_text('{"name": "x"}') and p / "k",
     "neither a 'training' list"),
])
def test_bad_inputs_are_one_line_input_errors(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(InputError, match=match) as err:
        load_manifest(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_split_ending():
    assert split_ending("a_0000.nii.gz") == ("a_0000", ".nii.gz")
    assert split_ending("X.PNG") == ("X", ".PNG")
    assert split_ending("notes.txt") == ("notes.txt", "")


def test_manifest_case_lookup():
    man = Manifest(Path("."), "t", [Case("a", "p", [Path("a.nii")], None)])
    assert man.case("a").patient_id == "p"
    with pytest.raises(KeyError):
        man.case("zz")
