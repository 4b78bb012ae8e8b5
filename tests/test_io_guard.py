"""The general mechanisms behind the hostile-input corpus: the size guard (medseg.io.guard), the one format table
(medseg.io.registry), stale-temporary cleanup (medseg.io.atomic), the config type validator and the input
accounting of batch prediction."""

from __future__ import annotations

import os
from pathlib import Path

import _hostile as H
import numpy as np
import pytest

from medseg.errors import ConfigError, InputError
from medseg.io import guard
from medseg.io.atomic import TMP_MARKER, atomic_path, remove_stale_temporaries, target_of_temporary


@pytest.fixture
def limit(monkeypatch):
    def set_(n):
        monkeypatch.setenv(guard.ENV_VAR, str(n))
    monkeypatch.setenv(guard.ENV_VAR, "1")
    monkeypatch.delenv(guard.ENV_VAR)
    return set_


# ------------------------------------------------------------------------------------------------ guard
@pytest.mark.parametrize("text,value", [("2e9", 2_000_000_000), ("500M", 500_000_000), ("2G", 2_000_000_000),
                                        ("1_000", 1000), (3.0e3, 3000), (" 7k ", 7000)])
def test_parse_max_voxels(text, value):
    assert guard.parse_max_voxels(text) == value


@pytest.mark.parametrize("bad", ["lots", "", "-5", "0", "nan", "inf", True, None, "1e9x"])
def test_parse_max_voxels_refuses(bad):
    with pytest.raises(ConfigError, match="max_voxels"):
        guard.parse_max_voxels(bad)


def test_check_voxels_names_declaration_and_limit(limit):
    limit(1000)
    guard.check_voxels("a.nii", (10, 10, 10))
    with pytest.raises(guard.SizeLimitError) as err:
        guard.check_voxels("a.nii", (10, 10, 10), channels=2)
    msg = str(err.value)
    assert msg.startswith("a.nii: declares a 10 x 10 x 10 grid with 2 channels (2e+03 voxels)") and "1e+03" in msg
    assert "--max-voxels 2e+03" in msg and "\n" not in msg


def test_default_limit_is_a_fraction_of_available_memory(limit, monkeypatch):
    monkeypatch.setattr(guard, "available_memory", lambda: (32 << 30, "available memory"))
    assert guard.max_voxels() == int((32 << 30) * guard.MEMORY_FRACTION / guard.BYTES_PER_VOXEL)
    assert "50% of the 32 GiB of available memory" in guard.limit_text()


def test_set_max_voxels_is_inherited_by_child_processes(limit):
    import subprocess
    import sys

    guard.set_max_voxels("3M")
    code = "import medseg.io.guard as g; print(g.max_voxels())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "3000000"
    guard.set_max_voxels(None)
    assert guard.ENV_VAR not in os.environ


def test_check_resampled_uses_target_spacing(limit):
    limit(10_000)
    assert guard.check_resampled("x", (10, 10, 10), (1.0, 1.0, 1.0), (2.0, 2.0, None)) == (5, 5, 10)
    with pytest.raises(guard.SizeLimitError, match=r"would be 100 x 100 x 10 \(1e\+05 voxel values\)"):
        guard.check_resampled("x", (10, 10, 10), (1.0, 1.0, 1.0), (0.1, 0.1, None))
    with pytest.raises(InputError, match="voxel size 0 mm"):
        guard.check_resampled("x", (10, 10, 10), (0.0, 1.0, 1.0), (1.0, 1.0, 1.0))


def test_every_reader_applies_the_limit_before_reading(tmp_path, limit):
    from medseg.io import Volume, read_volume, write_volume

    vol = Volume(np.zeros((1, 10, 10, 10), np.float32), np.eye(4))
    for name in ("a.nii.gz", "a.nii", "a.nrrd", "a.mha"):
        write_volume(vol, tmp_path / name)
    (tmp_path / "a.png").write_bytes(H.png_bytes(40, 25, b"\0" * (41 * 25)))
    H.dicom_series(tmp_path / "dcm", 10, rows=10, cols=10)
    limit(999)
    for p in [*(tmp_path / n for n in ("a.nii.gz", "a.nii", "a.nrrd", "a.mha", "a.png")), tmp_path / "dcm"]:
        with pytest.raises(guard.SizeLimitError, match="limit of 999 voxels"):
            read_volume(p)
    limit(1000)
    for p in [*(tmp_path / n for n in ("a.nii.gz", "a.nii", "a.nrrd", "a.mha", "a.png")), tmp_path / "dcm"]:
        assert read_volume(p).array.size == 1000


def test_memory_error_in_a_reader_is_one_line(tmp_path, monkeypatch):
    import medseg.io.nifti as nifti
    from medseg.io import read_volume

    p = H.write_nifti(tmp_path / "a.nii.gz", H.good_image())

    def boom(*a, **k):
        raise MemoryError

    monkeypatch.setattr(nifti, "read_nifti", boom)
    with pytest.raises(InputError, match="needs more memory than is available"):
        read_volume(p)


# ------------------------------------------------------------------------------------------------ table
def test_one_suffix_table_everywhere():
    from medseg.data import manifest
    from medseg.evaluation import evaluate
    from medseg.io import FORMATS, IMAGE_SUFFIXES, format_of, split_suffix

    assert manifest.IMAGE_ENDINGS is IMAGE_SUFFIXES and evaluate.SUFFIXES is IMAGE_SUFFIXES
    for fmt in FORMATS:
        for suffix in fmt.suffixes:
            assert format_of(f"x{suffix.upper()}") == fmt.name
            assert callable(fmt.load("reader"))
            if fmt.listed:
                assert split_suffix(f"case_0000{suffix}") == ("case_0000", suffix)
    assert list(IMAGE_SUFFIXES) == sorted(IMAGE_SUFFIXES, key=len, reverse=True)
    assert split_suffix("notes.txt") == ("notes.txt", "") and split_suffix(".nii.gz") == (".nii.gz", "")


def test_writer_rows(tmp_path):
    from medseg.io import Volume, write_volume

    with pytest.raises(InputError, match="writing DICOM series is not supported"):
        write_volume(Volume(np.zeros((1, 2, 2, 2)), np.eye(4)), tmp_path / "x.dcm")
    with pytest.raises(InputError, match="unknown file type"):
        write_volume(Volume(np.zeros((1, 2, 2, 2)), np.eye(4)), tmp_path / "x.jpg")


# ------------------------------------------------------------------------------------------------ temporaries
def test_remove_stale_temporaries_only_of_own_targets(tmp_path):
    with atomic_path(tmp_path / "a.nii.gz") as tmp:
        assert target_of_temporary(tmp.name) == "a.nii.gz"
        tmp.write_bytes(b"x")
    names = [f"{TMP_MARKER}0123abcd-a.nii.gz", f"{TMP_MARKER}0123abcd-b.nii.gz", f"{TMP_MARKER}xyz-c.nii.gz",
             "a.nii.gz.bak"]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    removed = remove_stale_temporaries(tmp_path, {"a.nii.gz"})
    assert [p.name for p in removed] == [names[0]]
    assert {p.name for p in remove_stale_temporaries(tmp_path)} == {names[1]}  # not the malformed one
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.nii.gz", names[2], names[3]])


# ------------------------------------------------------------------------------------------------ config types
def test_config_type_validator_names_key_value_and_type():
    from medseg.training.config import pipeline_from_dict

    base = {"name": "x", "dataset": "d"}
    cases = [({"folds": "two"}, "folds='two' is invalid; expected an integer"),
             ({"folds": True}, "folds=True is invalid; expected an integer"),
             ({"configuration": 3}, "configuration=3 is invalid; expected a string"),
             ({"train": {"lr": "fast"}}, "train.lr='fast' is invalid; expected a number"),
             ({"train": {"max_minutes": "soon"}}, "train.max_minutes='soon' is invalid; expected a number or null"),
             ({"train": {"augmentation": []}}, "train.augmentation=[] is invalid; expected a mapping or null"),
             ({"train": {"patch_size": [1.5, 2, 3]}}, "expected a list of integers or null"),
             ({"train": []}, "train=[] is invalid; expected a mapping")]
    for extra, fragment in cases:
        with pytest.raises(ConfigError) as err:
            pipeline_from_dict({**base, **extra}, where="p.yaml")
        assert fragment in str(err.value) and str(err.value).startswith("p.yaml: ")
    ok = pipeline_from_dict({**base, "folds": 3, "output": None, "max_voxels": "2G",
                             "train": {"lr": 1, "max_minutes": None, "patch_size": [16, 16, 16]}})
    assert ok.folds == 3 and ok.train.lr == 1 and ok.max_voxels == 2_000_000_000


# ------------------------------------------------------------------------------------------------ accounting
def test_discovery_accounts_for_every_entry(tmp_path):
    from medseg.inference.batch import discover_inputs

    H.write_nifti(tmp_path / "a.nii.gz", H.good_image())
    (tmp_path / "b.txt").write_text("x")
    os.symlink("nope", tmp_path / "c.nii.gz")
    H.dicom_series(tmp_path / "d", 2)
    H.dicom_seg_like(tmp_path / "e.dcm")
    os.mkfifo(tmp_path / "f")
    d = discover_inputs(tmp_path)
    assert [c.case_id for c in d.cases] == ["a", "d"]
    entries = {e.path: e for e in d.entries}
    assert set(entries) == {p.name for p in tmp_path.iterdir()}
    assert {e.path for e in d.skipped()} == {"b.txt", "c.nii.gz", "e.dcm", "f"}
    assert entries["d"].files == 2 and entries["a.nii.gz"].case_id == "a"


def test_check_image_values_decisions():
    from medseg.inference.batch import check_image_values
    from medseg.io import Volume

    def vol(a):
        return Volume(np.asarray(a, np.float32)[None], np.eye(4))

    img = vol(np.arange(8.0).reshape(2, 2, 2))
    img.array[0, 0, 0, 1] = np.nan
    warnings = check_image_values(img, "x")
    assert len(warnings) == 1 and "1 NaN voxel(s) of 8 set to the channel minimum 0" in warnings[0]
    assert not np.isnan(img.array).any()
    with pytest.raises(InputError, match="only NaN"):
        check_image_values(vol(np.full((2, 2, 2), np.nan)), "x")
    with pytest.raises(InputError, match="1 Inf voxel"):
        check_image_values(vol([[[0, np.inf], [0, 0]], [[0, 0], [0, 0]]]), "x")
    assert "blank image" in check_image_values(vol(np.ones((2, 2, 2))), "x")[0]


def test_report_write_survives_when_space_was_reserved(tmp_path, monkeypatch):
    import errno
    import json

    from medseg.inference.batch import ReportWriter

    writer = ReportWriter(tmp_path, reserve=4096)
    assert writer.reserved == 4096 and writer.tmp.stat().st_size == 4096
    real_open = open

    def no_new_files(path, mode="r", *a, **k):  # the disk is full now: no file may be created or grown
        if "w" in mode and not Path(path).exists():
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", no_new_files)
    path = writer.write({"cases": list(range(100))})
    monkeypatch.undo()
    assert json.loads(path.read_text())["cases"][-1] == 99
    assert [p.name for p in tmp_path.iterdir()] == ["predict_report.json"]
