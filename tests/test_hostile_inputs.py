"""A corpus of hostile and malformed inputs fed to `medseg info`, `convert`, `check-dataset`, `predict`, `train` and
`crossval`. Every input is made here by the test (tests/_hostile.py), small on disk.

Every run asserts: the exit code; one line naming the file and the fault; no traceback (and no "internal error",
the CLI's last-resort catch); for a batch, that the good case beside the hostile entry was written and that the
report accounts for every entry of the input; nothing left half-written (no ``.medseg-tmp-`` file). The bombs run in
a subprocess under an address-space limit (``ulimit -v``) whose peak RSS is measured.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import _hostile as H
import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.cli.main import main
from medseg.io.atomic import TMP_MARKER

PLAN = {
    "version": 1, "dataset": "hostile", "spatial_dims": 3, "in_channels": 1, "num_classes": 2,
    "labels": {"0": "background", "1": "thing"},
    "normalization": [{"scheme": "zscore", "mean": 0.0, "std": 1.0, "clip": None, "use_nonzero_mask": False}],
    "configurations": {
        "3d_fullres": {"spacing": [1.5, 1.5, 1.5], "patch_size": [16, 16, 16], "batch_size": 2,
                       "network": {"name": "unet", "kwargs": {"features": [4, 8], "strides": [1, 2],
                                                              "kernel_sizes": [3, 3]}},
                       "mirror_axes": [], "slicewise": False},
    },
}
NO_TRACE = ("Traceback", "internal error")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_model(root: Path, folds=(0,), listed=None) -> Path:
    """A run folder with randomly initialised folds (predictions need not be good here, only made)."""
    from medseg.networks import create_model, model_spec

    root.mkdir(parents=True, exist_ok=True)
    cfg = PLAN["configurations"]["3d_fullres"]
    (root / "plan.json").write_text(json.dumps(PLAN))
    (root / "model.json").write_text(json.dumps({"configuration": "3d_fullres", "folds": list(listed or folds),
                                                 "num_classes": 2, "network": cfg["network"],
                                                 "labels": PLAN["labels"]}))
    for k in folds:
        torch.manual_seed(k)
        net = create_model("unet", spatial_dims=3, in_channels=1, out_channels=2, **cfg["network"]["kwargs"])
        (root / f"fold_{k}").mkdir(exist_ok=True)
        torch.save({"network": model_spec(net), "state_dict": net.state_dict(), "epoch": 0,
                    "configuration": "3d_fullres"}, root / f"fold_{k}" / "checkpoint_best.pt")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "run")


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    for word in NO_TRACE:
        assert word not in cap.err and word not in cap.out, cap.err
    return rc, cap.out, cap.err


def no_temporaries(*folders: Path) -> None:
    for folder in folders:
        if folder.exists():
            left = [p for p in folder.rglob("*") if TMP_MARKER in p.name]
            assert not left, f"half-written files left: {left}"


def good_case(folder: Path, name: str = "good.nii.gz", seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return H.write_nifti(folder / name, H.good_image(seed))


# ================================================================================================ readers
@dataclass
class Kind:
    """One hostile input: ``make(folder) -> path``; the command's exit code and fragments of its one line."""

    name: str
    make: Callable[[Path], Path]
    rc: int
    fragments: tuple[str, ...]
    command: str = "info"


def _nii(name, data, affine=None, **header):
    return lambda d: H.write_nifti(d / name, data, affine, **header)


def _truncated_nii(d: Path) -> Path:
    p = H.write_nifti(d / "cut.nii", H.good_image())
    p.write_bytes(p.read_bytes()[:-500])
    return p


def _zero_pixdim(d: Path) -> Path:
    p = d / "flat.nii"
    img = nib.Nifti1Image(H.good_image(), None)
    img.set_sform(None, code=0)
    img.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    nib.save(img, str(p))
    raw = bytearray(p.read_bytes())
    raw[84:88] = np.float32(0.0).tobytes()  # pixdim[2] = 0
    p.write_bytes(bytes(raw))
    return p


def _rgb(d: Path) -> Path:
    rgb = np.zeros((8, 7, 5), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["G"] = 200
    return H.write_nifti(d / "rgb.nii.gz", rgb)


def _nan_sform(d: Path) -> Path:
    p = d / "nanaff.nii"
    img = nib.Nifti1Image(H.good_image(), H.GOOD_AFFINE)
    img.set_qform(None, code=0)
    nib.save(img, str(p))
    raw = bytearray(p.read_bytes())
    raw[280:284] = np.float32(np.nan).tobytes()  # srow_x[0]
    p.write_bytes(bytes(raw))
    return p


def _fifo(name: str):
    def make(d: Path) -> Path:
        os.mkfifo(d / name)
        return d / name
    return make


def _dangling(name: str):
    def make(d: Path) -> Path:
        os.symlink("nowhere.nii.gz", d / name)
        return d / name
    return make


def _dir_named(name: str):
    def make(d: Path) -> Path:
        (d / name).mkdir()
        return d / name
    return make


def _bytes(name: str, data: bytes):
    def make(d: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name
    return make


def _mhd_missing_data(d: Path) -> Path:
    (d / "x.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_FLOAT\n"
                             "ElementDataFile = missing.raw\n")
    return d / "x.mhd"


def _nhdr_foreign_file(d: Path) -> Path:
    (d / "x.nhdr").write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 64 64 64\nencoding: raw\n"
                              "endian: little\ndata file: /etc/hostname\n\n")
    return d / "x.nhdr"


def _gz_named_plain(d: Path) -> Path:
    p = H.write_nifti(d / "plain.nii", H.good_image())
    return p.rename(d / "plain_really.nii.gz")


def _bad_datatype(d: Path) -> Path:
    raw = bytearray(H.raw_nifti_header((4, 4, 4)))
    raw[70:72] = np.int16(1234).tobytes()  # datatype code nobody defines
    (d / "dtype.nii").write_bytes(bytes(raw) + b"\0" * 256)
    return d / "dtype.nii"


READER_KINDS = [
    Kind("nifti_gzip_bomb", lambda d: H.nifti_gzip_bomb(d / "bomb.nii.gz"), 1, ("1024 x 1024 x 1024", "voxels",
                                                                                 "limit")),
    Kind("nifti_huge_header", lambda d: H.nifti_huge_header(d / "huge.nii"), 1, ("30000 x 30000 x 30000", "limit")),
    Kind("nrrd_bomb", lambda d: H.nrrd_bomb(d / "bomb.nrrd"), 1, ("4000 x 4000 x 4000", "limit")),
    Kind("mha_bomb", lambda d: H.mha_bomb(d / "bomb.mha"), 1, ("4000 x 4000 x 4000", "limit")),
    Kind("png_bomb", lambda d: H.png_bomb(d / "bomb.png"), 1, ("60000 x 60000", "limit")),
    Kind("dicom_huge_rows", lambda d: H.dicom_huge_rows(d / "hugedcm"), 1, ("60000 x 60000", "limit")),
    Kind("nifti_truncated_plain", _truncated_nii, 1, ("is truncated",)),
    Kind("nifti_zero_pixdim", _zero_pixdim, 1, ("voxel size 0", "pixdim[2]")),
    Kind("nifti_complex", _nii("cplx.nii.gz", (H.good_image() + 1j).astype(np.complex64)), 1, ("complex",)),
    Kind("nifti_nan_sform", _nan_sform, 1, ("non-invertible",)),
    Kind("nifti_6d", _nii("six.nii.gz", np.zeros((3, 3, 3, 2, 2, 2), np.float32)), 1, ("6 dimensions",)),
    Kind("nifti_empty_file", _bytes("empty.nii.gz", b""), 1, ("cannot be read as NIfTI",)),
    Kind("nifti_gz_not_gzip", _gz_named_plain, 1, ("cannot be read as NIfTI",)),
    Kind("nifti_bad_datatype", _bad_datatype, 1, ("cannot be read as NIfTI",)),
    Kind("fifo_image", _fifo("pipe.nii.gz"), 1, ("not a regular file",)),
    Kind("dangling_link", _dangling("gone.nii.gz"), 1, ("dangling symbolic link",)),
    Kind("folder_named_nifti", _dir_named("dir.nii.gz"), 1, ("contains no DICOM files",)),
    Kind("folder_named_nifti_convert", _dir_named("dir.nii.gz"), 1, ("not a regular file",), command="convert"),
    Kind("mhd_missing_data", _mhd_missing_data, 1, ("cannot be read as an image",)),
    Kind("nhdr_foreign_data_file", _nhdr_foreign_file, 1, ("cannot be read as an image",)),
    Kind("dicom_truncated_pixels", lambda d: H.dicom_truncated(d / "trunc"), 1, ("pixel data is truncated",)),
    Kind("dicom_zero_pixel_spacing", lambda d: H.dicom_zero_spacing(d / "zero"), 1, ("non-invertible",)),
    Kind("dicom_seg_without_frames", lambda d: H.dicom_seg_like(d / "seg.dcm"), 1, ("DICOM-SEG",)),
    Kind("nifti_rgb_is_channels", _rgb, 0, ("3 channels",)),
    Kind("nifti_all_nan_described", _nii("nan.nii.gz", np.full((4, 4, 4), np.nan, np.float32)), 0,
         ("non-finite",)),
    Kind("convert_bomb", lambda d: H.nifti_huge_header(d / "huge.nii"), 1, ("limit",), command="convert"),
    Kind("convert_rgb_to_nrrd", _rgb, 0, (), command="convert"),
]


@pytest.mark.parametrize("kind", READER_KINDS, ids=lambda k: k.name)
def test_reader_corpus(kind: Kind, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    path = kind.make(src)
    before = sorted(p.name for p in src.rglob("*"))
    argv = [kind.command, path] + ([tmp_path / "out.nrrd"] if kind.command == "convert" else [])
    t0 = time.perf_counter()
    rc, out, err = run_cli(argv, capsys)
    assert time.perf_counter() - t0 < 20
    assert rc == kind.rc, err
    if kind.rc:
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"medseg {kind.command}: error: {path}"), lines[0]
        for frag in kind.fragments:
            assert frag in lines[0], lines[0]
        assert not (tmp_path / "out.nrrd").exists()
    else:
        for frag in kind.fragments:
            assert frag in out
    assert sorted(p.name for p in src.rglob("*")) == before
    no_temporaries(tmp_path)


def test_max_voxels_raises_and_lowers_the_limit(tmp_path, capsys):
    p = H.write_nifti(tmp_path / "a.nii.gz", H.good_image())
    n = int(np.prod(H.GOOD_SHAPE))
    rc, _, err = run_cli(["info", p, "--max-voxels", n - 1], capsys)
    assert rc == 1 and f"({n:.3g} voxels)" in err and "set by --max-voxels" in err and f"--max-voxels {n:.3g}" in err
    assert run_cli(["info", p, "--max-voxels", f"{n}"], capsys)[0] == 0
    assert run_cli(["info", p, "--max-voxels", "1K"], capsys)[0] == 1
    assert "MEDSEG_MAX_VOXELS" not in os.environ  # main() restores the process' setting
    with pytest.raises(SystemExit) as exc:
        main(["info", str(p), "--max-voxels", "lots"])
    assert exc.value.code == 2
    assert "not a positive number of voxels" in capsys.readouterr().err


def test_default_limit_follows_the_address_space_limit():
    code = ("import resource, medseg.io.guard as g; a = g.max_voxels(); "
            "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY)); b = g.max_voxels(); "
            "print(a, b, g.available_memory()[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[1]) <= min((3 << 30) // 32, int(out[0])) and out[2] == "address"


# ---------------------------------------------------------------------------------------- bombs, bounded
def _run_limited(argv: list[str], limit_bytes: int, timeout: float = 120) -> tuple[int, str, float, float]:
    """Run ``medseg ARGV`` under RLIMIT_AS; returns (rc, stderr, the child's peak RSS in MiB, seconds)."""
    import tempfile
    import threading

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MEDSEG_MAX_VOXELS", None)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "medseg.cli.main", *map(str, argv)],
                                stdout=subprocess.DEVNULL, stderr=err_file, preexec_fn=limit, env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err_file.seek(0)
        err = err_file.read().decode()
    return proc.returncode, err, usage.ru_maxrss / 1024, time.perf_counter() - t0


BOMBS = [("gzbomb.nii.gz", H.nifti_gzip_bomb), ("huge.nii", H.nifti_huge_header), ("nrrdbomb.nrrd", H.nrrd_bomb),
         ("mhabomb.mha", H.mha_bomb), ("pngbomb.png", H.png_bomb)]


@pytest.mark.parametrize("name,make", BOMBS, ids=[b[0] for b in BOMBS])
def test_bomb_info_under_address_space_limit(tmp_path, name, make):
    path = make(tmp_path / name)
    rc, err, peak, seconds = _run_limited(["info", path], 2 << 30)
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"medseg info: error: {path}") and "limit" in lines[0], err
    assert "Traceback" not in err and seconds < 30
    assert peak < 1024, f"peak RSS {peak:.0f} MiB"


def test_bombs_in_a_predict_batch_under_address_space_limit(tmp_path, model_dir):
    inp, out = tmp_path / "in", tmp_path / "out"
    good_case(inp)
    for name, make in BOMBS:
        make(inp / name)
    rc, err, peak, seconds = _run_limited(["predict", "-i", inp, "-o", out, "-m", model_dir, "--device", "cpu",
                                           "--no-tta"], 4 << 30, timeout=300)
    assert rc == 1 and "Traceback" not in err, err
    failed = [ln for ln in err.splitlines() if "FAILED" in ln]
    assert len(failed) == len(BOMBS) and all("limit" in ln for ln in failed), err
    assert (out / "good.nii.gz").is_file() and seconds < 120
    assert peak < 2048, f"peak RSS {peak:.0f} MiB"
    report = json.loads((out / "predict_report.json").read_text())
    assert report["counts"] == {"written": 1, "skipped": 0, "failed": len(BOMBS)}
    no_temporaries(out)


# ================================================================================================ predict
@dataclass
class Entry:
    """A hostile entry placed beside a good case: its top-level name, expected status and reason fragment."""

    name: str
    make: Callable[[Path], object]
    status: str  # predicted | skipped | failed
    fragment: str
    warning: str = ""


def _link_loop(d: Path) -> None:
    os.symlink("loop_b", d / "loop_a")
    os.symlink("loop_a", d / "loop_b")


def _link_up(d: Path) -> None:
    os.symlink("..", d / "up")


def _nested(d: Path) -> None:
    H.write_nifti((d / "nested").mkdir() or d / "nested" / "img.nii.gz", H.good_image())


def _stray_dicom(d: Path) -> None:
    H.dicom_series(d, 3, rows=12, cols=10)


def _absurd_spacing(d: Path) -> None:
    H.write_nifti(d / "far.nii.gz", H.good_image(), np.diag([1e5, 1e5, 1e5, 1.0]))


def _partial_nan(d: Path) -> None:
    data = H.good_image(3)
    data[:2] = np.nan
    H.write_nifti(d / "somenan.nii.gz", data)


def _float64_overflow(d: Path) -> None:
    data = H.good_image(4).astype(np.float64)
    data[0, 0, 0] = 1e300
    H.write_nifti(d / "big64.nii.gz", data)


def _inf(d: Path) -> None:
    data = H.good_image(5)
    data[3, 3, 3] = np.inf
    H.write_nifti(d / "inf.nii.gz", data)


PREDICT_ENTRIES = [
    Entry("dangling.nii.gz", _dangling("dangling.nii.gz"), "skipped", "dangling symbolic link"),
    Entry("loop_a", _link_loop, "skipped", "symbolic link loop"),
    Entry("up", _link_up, "skipped", "contains the input"),
    Entry("notes.txt", _bytes("notes.txt", b"hello\n"), "skipped", "unsupported file type '.txt'"),
    Entry("pipe.nii.gz", _fifo("pipe.nii.gz"), "skipped", "not a regular file"),
    Entry(".DS_Store", _bytes(".DS_Store", b"\0" * 16), "skipped", "hidden"),
    Entry(f"{TMP_MARKER}0badc0de-old.nii.gz", _bytes(f"{TMP_MARKER}0badc0de-old.nii.gz", b"x"), "skipped",
          "temporary file"),
    Entry("DICOMDIR", _bytes("DICOMDIR", b"\0" * 200), "skipped", "DICOMDIR"),
    Entry("nested", _nested, "skipped", "sub-folders are read as DICOM series only"),
    Entry("emptydir", lambda d: (d / "emptydir").mkdir(), "skipped", "folder without DICOM files"),
    Entry("seg.dcm", lambda d: H.dicom_seg_like(d / "seg.dcm"), "skipped", "SEG"),
    Entry("im001.dcm", _stray_dicom, "predicted", ""),
    Entry("series", lambda d: H.dicom_series(d / "series", 3, rows=12, cols=10), "predicted", ""),
    Entry("trunc", lambda d: H.dicom_truncated(d / "trunc"), "failed", "pixel data is truncated"),
    Entry("zero", lambda d: H.dicom_zero_spacing(d / "zero"), "failed", "non-invertible"),
    Entry("hugedcm", lambda d: H.dicom_huge_rows(d / "hugedcm"), "failed", "limit"),
    Entry("empty.nii.gz", _bytes("empty.nii.gz", b""), "failed", "cannot be read as NIfTI"),
    Entry("cut.nii", _truncated_nii, "failed", "is truncated"),
    Entry("flat.nii", _zero_pixdim, "failed", "voxel size 0"),
    Entry("rgb.nii.gz", _rgb, "failed", "has 3 channels"),
    Entry("cplx.nii.gz", _nii("cplx.nii.gz", (H.good_image() + 1j).astype(np.complex64)), "failed", "complex"),
    Entry("nan.nii.gz", _nii("nan.nii.gz", np.full(H.GOOD_SHAPE, np.nan, np.float32)), "failed", "only NaN"),
    Entry("inf.nii.gz", _inf, "failed", "Inf voxel"),
    Entry("somenan.nii.gz", _partial_nan, "predicted", "", warning="NaN voxel(s)"),
    Entry("blank.nii.gz", _nii("blank.nii.gz", np.zeros(H.GOOD_SHAPE, np.float32)), "predicted", "",
          warning="blank image"),
    Entry("big64.nii.gz", _float64_overflow, "failed", "float32 range"),
    Entry("far.nii.gz", _absurd_spacing, "failed", "resampled to the plan spacing"),
    Entry("six.nii.gz", _nii("six.nii.gz", np.zeros((3, 3, 3, 2, 2, 2), np.float32)), "failed", "6 dimensions"),
    Entry("two.nii.gz", _nii("two.nii.gz", np.zeros((*H.GOOD_SHAPE, 2), np.float32)), "failed", "has 2 channels"),
    Entry("flat2d.png", _bytes("flat2d.png", H.png_bytes(8, 8, b"\0" * 72)), "failed", "is 2D"),
    Entry("nanaff.nii", _nan_sform, "failed", "non-invertible"),
    Entry("huge.nii", lambda d: H.nifti_huge_header(d / "huge.nii"), "failed", "limit"),
    Entry("dir.nii.gz", _dir_named("dir.nii.gz"), "skipped", "folder without DICOM files"),
]


@pytest.mark.parametrize("entry", PREDICT_ENTRIES, ids=lambda e: e.name)
def test_predict_corpus(entry: Entry, model_dir, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    good_case(inp)
    entry.make(inp)
    listing = sorted(p.name for p in inp.iterdir())
    rc, stdout, err = run_cli(["predict", "-i", inp, "-o", out, "-m", model_dir, "--device", "cpu", "--no-tta"],
                              capsys)
    assert rc == (1 if entry.status == "failed" else 0), err
    assert (out / "good.nii.gz").is_file(), err
    report = json.loads((out / "predict_report.json").read_text())
    inputs = {e["path"]: e for e in report["inputs"]}
    assert set(listing) <= set(inputs), f"report misses {set(listing) - set(inputs)}"
    assert all(e["status"] in ("predicted", "skipped", "failed") for e in inputs.values())
    assert all(e.get("reason") for e in inputs.values() if e["status"] != "predicted")
    got = inputs[entry.name]
    assert got["status"] == entry.status, got
    assert entry.fragment in (got.get("reason") or ""), got
    if entry.status != "predicted":  # one line on stderr names the entry and the fault
        lines = [ln for ln in err.splitlines() if entry.fragment in ln]
        assert lines and all(("FAILED" in ln or "skipped" in ln) for ln in lines), err
        assert any(entry.name in ln or (got.get("case_id") or "\0") in ln for ln in lines), err
    else:
        case = next(c for c in report["cases"] if c["case_id"] == got["case_id"])
        assert case["status"] == "written" and (out / f"{got['case_id']}.nii.gz").is_file()
        if entry.warning:
            assert any(entry.warning in w for w in case["warnings"]), case
            assert any(entry.warning in ln for ln in err.splitlines())
    assert sum(report["input_counts"].values()) == len(report["inputs"])
    assert sorted(p.name for p in inp.iterdir()) == listing  # the input is never touched
    no_temporaries(out)


def test_mixed_folder_predicts_every_kind(model_dir, tmp_path, capsys):
    """NIfTI cases, loose DICOM files of two series, a DICOM-SEG, a series folder and an NRRD in one folder."""
    from medseg.io import Volume, write_volume

    inp, out = tmp_path / "mixed", tmp_path / "out"
    for i in range(2):
        good_case(inp, f"case{i}.nii.gz", seed=i)
    write_volume(Volume(H.good_image(7)[None], H.GOOD_AFFINE), inp / "other.nrrd")
    H.dicom_series(inp, 3, rows=12, cols=10, description="A")
    H.dicom_series(inp / "tmpa", 4, rows=12, cols=10, description="B")
    import pydicom

    for f in (inp / "tmpa").iterdir():  # second loose series: other SeriesNumber, moved beside the first
        ds = pydicom.dcmread(f)
        ds.SeriesNumber = 7
        ds.save_as(inp / f"b_{f.name}")
        f.unlink()
    (inp / "tmpa").rmdir()
    H.dicom_seg_like(inp / "seg.dcm")
    H.dicom_series(inp / "series", 3, rows=12, cols=10)
    rc, _, err = run_cli(["predict", "-i", inp, "-o", out, "-m", model_dir, "--device", "cpu", "--no-tta"], capsys)
    assert rc == 0, err
    written = sorted(p.name for p in out.glob("*.nii.gz"))
    assert written == ["case0.nii.gz", "case1.nii.gz", "mixed_s1.nii.gz", "mixed_s7.nii.gz", "other.nii.gz",
                       "series.nii.gz"]
    report = json.loads((out / "predict_report.json").read_text())
    assert report["input_counts"]["failed"] == 0 and report["input_counts"]["skipped"] == 1
    assert {e["path"] for e in report["inputs"]} >= {p.name for p in inp.iterdir()}


def test_dicom_folder_accounts_for_files_outside_the_series(model_dir, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    H.dicom_series(inp / "s1", 3, rows=12, cols=10)
    (inp / "s1" / "README.txt").write_text("exported by ...")
    H.dicom_seg_like(inp / "s1" / "seg.dcm")
    rc, _, err = run_cli(["predict", "-i", inp, "-o", out, "-m", model_dir, "--device", "cpu", "--no-tta"], capsys)
    assert rc == 0, err
    inputs = {e["path"]: e for e in json.loads((out / "predict_report.json").read_text())["inputs"]}
    assert inputs["s1"]["status"] == "predicted" and inputs["s1"]["files"] == 5
    assert inputs["s1/README.txt"]["status"] == "skipped" and inputs["s1/seg.dcm"]["status"] == "skipped"


def test_two_inputs_for_one_case_name_is_refused_before_predicting(model_dir, tmp_path, capsys):
    from medseg.io import Volume, write_volume

    inp, out = tmp_path / "in", tmp_path / "out"
    good_case(inp, "a.nii.gz")
    write_volume(Volume(H.good_image()[None], H.GOOD_AFFINE), inp / "a.nrrd")
    rc, _, err = run_cli(["-q", "predict", "-i", inp, "-o", out, "-m", model_dir, "--device", "cpu"], capsys)
    assert rc == 1 and "two inputs for case 'a'" in err and len(err.strip().splitlines()) == 1


def test_empty_input_folder_says_what_it_holds(model_dir, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "notes.txt").write_text("x")
    os.symlink("missing", inp / "link")
    rc, _, err = run_cli(["-q", "predict", "-i", inp, "-o", tmp_path / "out", "-m", model_dir, "--device", "cpu"],
                         capsys)
    assert rc == 1 and "holds no images" in err and "notes.txt (not an image" in err and "dangling" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["file", "input"])
def test_output_path_that_cannot_be_the_output(model_dir, tmp_path, capsys, where):
    inp = tmp_path / "in"
    good_case(inp)
    out = tmp_path / "taken.txt" if where == "file" else inp
    if where == "file":
        out.write_text("precious")
    rc, _, err = run_cli(["-q", "predict", "-i", inp, "-o", out, "-m", model_dir, "--device", "cpu"], capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert ("exists and is not a folder" if where == "file" else "is the input folder") in err
    assert sorted(p.name for p in inp.iterdir()) == ["good.nii.gz"]
    if where == "file":
        assert out.read_text() == "precious"


def test_output_folder_inside_the_input_is_not_read_as_input(model_dir, tmp_path, capsys):
    inp = tmp_path / "in"
    good_case(inp)
    args = ["predict", "-i", inp, "-o", inp / "masks", "-m", model_dir, "--device", "cpu", "--no-tta"]
    assert run_cli(args, capsys)[0] == 0
    assert run_cli(args, capsys)[0] == 0  # second run: the masks folder is not a case
    report = json.loads((inp / "masks" / "predict_report.json").read_text())
    inputs = {e["path"]: e for e in report["inputs"]}
    assert inputs["masks"]["reason"] == "this run's output folder"
    assert report["counts"] == {"written": 0, "skipped": 1, "failed": 0}


def test_shard_report_accounts_for_other_shards_cases(model_dir, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        good_case(inp, f"c{i}.nii.gz", seed=i)
    args = ["predict", "-i", inp, "-o", out, "-m", model_dir, "--device", "cpu", "--no-tta", "--shard", "1/2"]
    assert run_cli(args, capsys)[0] == 0
    inputs = {e["path"]: e for e in json.loads((out / "predict_report.shard-1-of-2.json").read_text())["inputs"]}
    assert inputs["c1.nii.gz"]["status"] == "predicted"
    assert inputs["c0.nii.gz"]["status"] == "skipped" and "shard 0/2" in inputs["c0.nii.gz"]["reason"]


# ================================================================================================ data sets
def _dataset(root: Path, meta: dict | None, n: int = 2, *, nnunet: bool = False) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(n):
        img = H.good_image(i, (8, 8, 6))
        lab = (img > 2).astype(np.uint8)
        name = f"case{i}_0000.nii.gz" if nnunet else f"case{i}.nii.gz"
        H.write_nifti(root / "imagesTr" / name, img)
        H.write_nifti(root / "labelsTr" / f"case{i}.nii.gz", lab)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/case{i}.nii.gz"})
    if meta is not None:
        text = json.dumps(meta(training) if callable(meta) else meta)
        (root / "dataset.json").write_text(text)
    return root


MSD_LABELS = {"0": "background", "1": "thing"}


def _write(name: str, text: str):
    def make(root: Path) -> Path:
        _dataset(root, None)
        (root / name).write_text(text)
        return root
    return make


DATASET_KINDS = [
    Kind("labels_is_a_list", lambda r: _dataset(r, lambda t: {"labels": ["background", "thing"], "training": t}),
         1, ("'labels' is ['background', 'thing'] (a list)",), "check-dataset"),
    Kind("no_labels_msd", lambda r: _dataset(r, lambda t: {"training": t}), 1, ("declares no 'labels'",),
         "check-dataset"),
    Kind("numtraining_disagrees", lambda r: _dataset(r, lambda t: {"labels": MSD_LABELS, "numTraining": 5,
                                                                   "training": t}),
         1, ("numTraining is 5 but 2 case(s)",), "check-dataset"),
    Kind("nnunet_without_labels", lambda r: _dataset(r, {"channel_names": {"0": "MR"}, "file_ending": ".nii.gz"},
                                                     nnunet=True), 1, ("declares no 'labels'",), "check-dataset"),
    Kind("nnunet_wrong_naming", lambda r: _dataset(r, {"channel_names": {"0": "MR"}, "labels": {"background": 0},
                                                       "file_ending": ".nii.gz"}),
         1, ("looked for CASE_0000.nii.gz", "case0.nii.gz"), "check-dataset"),
    Kind("msd_list_with_file_ending", lambda r: _dataset(r, lambda t: {"labels": MSD_LABELS, "file_ending": ".nii.gz",
                                                                       "training": t}),
         0, ("2 cases",), "check-dataset"),
    Kind("json_array", _write("dataset.json", "[1, 2]"), 1, ("does not hold a JSON object",), "check-dataset"),
    Kind("json_garbage", _write("dataset.json", "{labels: oops"), 1, ("is not valid JSON",), "check-dataset"),
    Kind("training_entry_not_a_path", lambda r: _dataset(r, {"labels": MSD_LABELS, "training": [{"image": 5}]}),
         1, ("training[0].image is 5",), "check-dataset"),
    Kind("labels_share_a_value", lambda r: _dataset(r, lambda t: {"labels": {"a": 1, "b": 1}, "training": t}),
         1, ("share the value 1",), "check-dataset"),
    Kind("label_value_infinite", _write("dataset.json", '{"labels": {"a": Infinity}, "training": [{"image": '
                                        '"./imagesTr/case0.nii.gz", "label": "./labelsTr/case0.nii.gz"}]}'),
         1, ("has no integer value",), "check-dataset"),
    Kind("channel_names_list", lambda r: _dataset(r, {"channel_names": ["MR"], "file_ending": ".nii.gz",
                                                      "labels": {"background": 0}}, nnunet=True),
         1, ("'channel_names' is ['MR'] (a list)",), "check-dataset"),
    Kind("bomb_case_in_dataset", lambda r: (_dataset(r, lambda t: {"labels": MSD_LABELS, "training": t}),
                                            H.nifti_huge_header(r / "imagesTr" / "case0.nii.gz"))[0],
         1, ("limit",), "check-dataset"),
]


@pytest.mark.parametrize("kind", DATASET_KINDS, ids=lambda k: k.name)
def test_dataset_corpus(kind: Kind, tmp_path, capsys):
    root = kind.make(tmp_path / "ds")
    rc, out, err = run_cli(["check-dataset", root], capsys)
    assert rc == kind.rc, out + err
    text = out + err
    for frag in kind.fragments:
        assert frag in text, text
    if "error:" in err:  # refused while loading: exactly one line naming the file
        assert len(err.strip().splitlines()) == 1 and str(root) in err
    no_temporaries(root)


def test_csv_manifest_saved_by_excel_with_bom(tmp_path, capsys):
    root = _dataset(tmp_path / "ds", None)
    rows = "\r\n".join(["case_id,patient_id,image,label"]
                       + [f"case{i},p{i},imagesTr/case{i}.nii.gz,labelsTr/case{i}.nii.gz" for i in range(2)])
    (root / "manifest.csv").write_bytes(b"\xef\xbb\xbf" + rows.encode() + b"\r\n")
    rc, out, _ = run_cli(["check-dataset", root / "manifest.csv"], capsys)
    assert "2 cases of 2 patients" in out and "warning" in out  # no dataset.json: labels undeclared is a warning
    assert rc == 0


def test_msd_file_that_lists_cases_is_msd_even_with_nnunet_keys(tmp_path):
    from medseg.data.manifest import load_manifest

    root = _dataset(tmp_path / "ds", lambda t: {"labels": MSD_LABELS, "file_ending": ".nii.gz",
                                                "channel_names": {"0": "MR"}, "training": t})
    man = load_manifest(root)
    assert man.layout == "MSD" and [c.case_id for c in man.cases] == ["case0", "case1"]


# ================================================================================================ configs
def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pipe.yaml"
    p.write_text(text)
    return p


BASE_YAML = "name: t\ndataset: ./data\noutput: {out}\n"
CONFIG_KINDS = [
    ("folds_two", "folds: two\n", "crossval", "folds='two' is invalid; expected an integer"),
    ("lr_string", "train:\n  lr: fast\n", "train", "train.lr='fast' is invalid; expected a number"),
    ("epochs_float", "train:\n  epochs: 1.5\n", "train", "train.epochs=1.5 is invalid; expected an integer"),
    ("train_not_mapping", "train: 5\n", "train", "train=5 is invalid; expected a mapping"),
    ("bool_as_string", "train:\n  deep_supervision: 'yes please'\n", "crossval", "expected true or false"),
    ("patch_not_ints", "train:\n  patch_size: [a, b, c]\n", "train", "expected a list of integers or null"),
    ("max_voxels_word", "max_voxels: lots\n", "train", "max_voxels='lots' is invalid"),
    ("seed_null", "seed: null\n", "crossval", "seed=None is invalid; expected an integer"),
    ("lr_nan", "train:\n  lr: .nan\n", "train", "train.lr=nan is invalid; expected a number"),
]


@pytest.mark.parametrize("name,extra,command,fragment", CONFIG_KINDS, ids=[c[0] for c in CONFIG_KINDS])
def test_config_corpus(tmp_path, capsys, name, extra, command, fragment):
    cfg = _yaml(tmp_path, BASE_YAML.format(out=tmp_path / "run") + extra)
    argv = [command, "--config", cfg] + (["--fold", "0"] if command == "train" else [])
    rc, _, err = run_cli(argv, capsys)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and str(cfg) in lines[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,fragment", [("- a\n- b\n", "a YAML mapping"), ("name: [unclosed\n", "not valid YAML")])
def test_yaml_that_is_not_a_pipeline(tmp_path, capsys, text, fragment):
    rc, _, err = run_cli(["crossval", "--config", _yaml(tmp_path, text)], capsys)
    assert rc == 1 and fragment in err and len(err.strip().splitlines()) == 1


def test_run_folder_that_is_a_file(tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    cfg = _yaml(tmp_path, BASE_YAML.format(out=tmp_path / "run"))
    rc, _, err = run_cli(["train", "--config", cfg, "--fold", "0"], capsys)
    assert rc == 1 and "exists and is not a folder" in err and len(err.strip().splitlines()) == 1


def test_pipeline_yaml_sets_the_voxel_limit(tmp_path, monkeypatch):
    import argparse

    from medseg.cli.train import prepare_run
    from medseg.io.guard import ENV_VAR, max_voxels
    from medseg.training.config import load_pipeline

    monkeypatch.setenv(ENV_VAR, "1")  # restored (removed) at teardown
    monkeypatch.delenv(ENV_VAR)
    pipe = load_pipeline(_yaml(tmp_path, BASE_YAML.format(out=tmp_path / "run") + "max_voxels: 2.5e9\n"))
    assert pipe.max_voxels == 2_500_000_000
    prepare_run(pipe, argparse.Namespace(max_voxels=None), [0])
    assert max_voxels() == 2_500_000_000
    prepare_run(pipe, argparse.Namespace(max_voxels=7), [0])  # --max-voxels wins over the YAML
    assert max_voxels() == 2_500_000_000  # (main() set 7 itself; prepare_run leaves it alone)


# ================================================================================================ faults
def test_stale_temporaries_of_a_killed_overwrite_go_on_a_plain_rerun(model_dir, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    good_case(inp)
    base = ["predict", "-i", inp, "-o", out, "-m", model_dir, "--device", "cpu", "--no-tta"]
    assert run_cli(base, capsys)[0] == 0
    # what kill -9 during `--overwrite --save-probabilities` leaves: temporaries of this case's outputs
    for name in ("good.nii.gz", "good_probabilities.nii.gz", "predict_report.json"):
        (out / f"{TMP_MARKER}1234abcd-{name}").write_bytes(b"\x1f\x8b partial")
    (out / f"{TMP_MARKER}99999999-someone_else.nii.gz").write_bytes(b"x")  # not this input's: left alone
    assert run_cli(base, capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["good.nii.gz", "predict_report.json",
                                                            f"{TMP_MARKER}99999999-someone_else.nii.gz"])


def test_kill_9_during_overwrite_then_plain_rerun_leaves_no_temporary(model_dir, tmp_path):
    import signal

    inp, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        good_case(inp, f"c{i}.nii.gz", seed=i)
    big = H.good_image(9, (96, 96, 64))
    H.write_nifti(inp / "big.nii.gz", big)
    cmd = [sys.executable, "-m", "medseg.cli.main", "predict", "-i", str(inp), "-o", str(out), "-m", str(model_dir),
           "--device", "cpu", "--no-tta"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run(cmd, capture_output=True, env=env).returncode == 0
    proc = subprocess.Popen(cmd + ["--overwrite", "--save-probabilities"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline, seen = time.time() + 120, False
    while time.time() < deadline and proc.poll() is None:
        if any(TMP_MARKER in p.name and "report" not in p.name for p in out.iterdir()):
            seen = True
            break
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr
    left = [p.name for p in out.iterdir() if TMP_MARKER in p.name]
    assert not left, left
    if not seen:
        pytest.skip("the killed run wrote no temporary before it finished (machine too fast); cleanup still checked")


def test_zero_byte_checkpoint_temporaries_are_removed_by_the_next_train(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "fold_0").mkdir(parents=True)
    (run / "fold_1").mkdir()
    stale = run / "fold_0" / f"{TMP_MARKER}0123abcd-checkpoint_latest.pt"
    other = run / "fold_1" / f"{TMP_MARKER}0123abcd-checkpoint_latest.pt"
    stale.write_bytes(b"")
    other.write_bytes(b"")
    cfg = _yaml(tmp_path, f"name: t\ndataset: {tmp_path / 'missing'}\noutput: {run}\n")
    rc, _, err = run_cli(["-q", "train", "--config", cfg, "--fold", "0"], capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "missing" in err
    assert not stale.exists() and other.exists()  # only the fold this process owns


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(disk: Path, leave: int) -> None:
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


def test_full_disk_cases_fail_one_line_each_and_the_report_survives(model_dir, tmp_path, tiny_disk, capsys):
    inp, out = tmp_path / "in", tiny_disk / "out"
    for i in range(6):
        good_case(inp, f"c{i}.nii.gz", seed=i)
    out.mkdir()
    _fill(tiny_disk, 160 << 10)
    rc, stdout, err = run_cli(["predict", "-i", inp, "-o", out, "-m", model_dir, "--device", "cpu", "--no-tta",
                               "--save-probabilities", "--uncertainty"], capsys)
    assert rc == 1
    failed = [ln for ln in err.splitlines() if "FAILED" in ln]
    assert failed and all("No space left on device" in ln for ln in failed), err
    report = json.loads((out / "predict_report.json").read_text())
    assert report["counts"]["failed"] == len(failed) and report["counts"]["written"] >= 1
    assert len(report["inputs"]) == 6
    no_temporaries(out)


def test_full_disk_without_room_for_the_report_fails_in_one_line(model_dir, tmp_path, tiny_disk, capsys):
    inp, out = tmp_path / "in", tiny_disk / "out"
    good_case(inp)
    out.mkdir()
    _fill(tiny_disk, 0)
    rc, stdout, err = run_cli(["predict", "-i", inp, "-o", out, "-m", model_dir, "--device", "cpu", "--no-tta"],
                              capsys)
    assert rc == 1
    assert "predict_report.json: cannot be written (No space left on device)" in err
    assert "0 written" in stdout
    no_temporaries(out)


# ================================================================================================ checkpoints
# The lead's runtime module owns checkpoint loading: these assert the outcome through the CLI.
class Payload:
    """Unpickling this runs a shell command: what a refused checkpoint may carry."""

    def __reduce__(self):
        return (os.system, ("true",))


def _pickle_payload_checkpoint(path: Path) -> None:
    torch.save({"state_dict": {}, "network": {"name": "unet"}, "payload": Payload()}, path)


@pytest.mark.parametrize("fault", ["empty_checkpoint", "pickle_payload", "missing_fold_checkpoint"])
def test_model_folder_faults(tmp_path, capsys, fault):
    model = make_model(tmp_path / "run", folds=(0, 1))
    ckpt = model / "fold_1" / "checkpoint_best.pt"
    if fault == "empty_checkpoint":
        ckpt.write_bytes(b"")
    elif fault == "pickle_payload":
        _pickle_payload_checkpoint(ckpt)
    else:
        ckpt.unlink()
    inp = tmp_path / "in"
    good_case(inp)
    rc, _, err = run_cli(["-q", "predict", "-i", inp, "-o", tmp_path / "out", "-m", model, "--device", "cpu"], capsys)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "fold_1" in lines[0], err
    assert not (tmp_path / "out" / "good.nii.gz").exists()
    assert "weights_only=False" not in err
    if fault == "pickle_payload":
        assert "safety" in err or "more than tensors" in err


def test_corpus_has_at_least_40_kinds():
    kinds = (len(READER_KINDS) + len(PREDICT_ENTRIES) + len(DATASET_KINDS) + len(CONFIG_KINDS) + len(BOMBS) + 8)
    assert kinds >= 40


def test_crossval_on_a_dataset_with_a_bomb_fails_in_one_line(tmp_path, capsys):
    root = _dataset(tmp_path / "ds", lambda t: {"labels": MSD_LABELS, "training": t}, n=3)
    H.nifti_huge_header(root / "labelsTr" / "case1.nii.gz")
    cfg = _yaml(tmp_path, f"name: t\ndataset: {root}\noutput: {tmp_path / 'run'}\nfolds: 2\n"
                          "train:\n  epochs: 1\n  device: cpu\n")
    rc, _, err = run_cli(["-q", "crossval", "--config", cfg], capsys)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "case1.nii.gz: declares a 30000 x 30000 x 30000 grid" in lines[0], err
    no_temporaries(tmp_path / "run")
