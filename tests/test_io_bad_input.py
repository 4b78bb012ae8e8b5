"""Bad input: each a one-line InputError naming the file, through the API and through the CLI (no traceback)."""

from __future__ import annotations

import gzip
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from medseg.cli.main import main
from medseg.errors import InputError
from medseg.io import read_volume


def _nifti(path, shape=(6, 7, 5), affine=None):
    nib.save(nib.Nifti1Image(np.arange(np.prod(shape), dtype=np.float32).reshape(shape),
                             np.diag([1.2, 0.8, 2.5, 1]) if affine is None else affine), path)
    return path


def make_bad(kind: str, tmp_path):
    """Create one bad input; returns (path, read_volume kwargs, fragment of the expected message)."""
    if kind == "truncated_gz":
        good = _nifti(tmp_path / "good.nii.gz", shape=(30, 30, 30))
        data = good.read_bytes()
        bad = tmp_path / "truncated.nii.gz"
        bad.write_bytes(data[: len(data) // 2])
        return bad, {}, "cannot be read as NIfTI"
    if kind == "text_as_nifti":
        bad = tmp_path / "notes.nii.gz"
        bad.write_text("this is not an image\n")
        return bad, {}, "cannot be read as NIfTI"
    if kind == "gzipped_text":
        bad = tmp_path / "gz.nii.gz"
        bad.write_bytes(gzip.compress(b"hello" * 100))
        return bad, {}, "cannot be read as NIfTI"
    if kind == "empty_folder":
        bad = tmp_path / "empty"
        bad.mkdir()
        return bad, {}, "contains no DICOM files"
    if kind == "two_series":
        from test_io_dicom import write_series  # tests/ is on sys.path (pytest's default prepend import mode)

        write_series(tmp_path / "two" / "a", [np.array([0, 0, 2.0 * k]) for k in range(3)], description="T1")
        write_series(tmp_path / "two" / "b", [np.array([0, 0, 2.0 * k]) for k in range(4)], description="T2")
        return tmp_path / "two", {}, "contains 2 image series"
    if kind == "4d_where_3d":
        return _nifti(tmp_path / "fmri.nii.gz", shape=(6, 7, 5, 4)), {"max_channels": 1}, \
            "has 4 dimensions (6, 7, 5, 4)"
    if kind == "singular_affine":
        aff = np.diag([1.0, 1.0, 1.0, 1.0])
        aff[:3, 2] = aff[:3, 0]  # two voxel axes point the same way
        return _nifti(tmp_path / "flat.nii.gz", affine=aff), {}, "non-invertible"
    if kind == "missing":
        return tmp_path / "nope.nii.gz", {}, "does not exist"
    if kind == "unknown_suffix":
        bad = tmp_path / "image.jpgx"
        bad.write_text("x")
        return bad, {}, "unknown file type"
    if kind == "2d_where_3d":
        return _nifti(tmp_path / "slice.nii.gz", shape=(6, 7)), {"spatial_dims": 3}, "expected a 3D image"
    raise AssertionError(kind)


KINDS = ["truncated_gz", "text_as_nifti", "gzipped_text", "empty_folder", "two_series", "4d_where_3d",
         "singular_affine", "missing", "unknown_suffix", "2d_where_3d"]


@pytest.mark.parametrize("kind", KINDS)
def test_api_raises_one_line_input_error(tmp_path, kind):
    path, kwargs, fragment = make_bad(kind, tmp_path)
    with pytest.raises(InputError) as err:
        read_volume(path, **kwargs)
    msg = str(err.value)
    assert msg.startswith(str(path)) and fragment in msg and "\n" not in msg


# `medseg info` on a folder with two series lists them (tested in test_cli_info_convert.py), so it is no error.
CLI_CASES = [(k, c) for c in ("info", "convert") for k in KINDS
             if k not in ("4d_where_3d", "2d_where_3d") and (k, c) != ("two_series", "info")]


@pytest.mark.parametrize("kind,command", CLI_CASES)
def test_cli_prints_one_line(tmp_path, capsys, kind, command):
    path, _, fragment = make_bad(kind, tmp_path)
    argv = [command, str(path)] + ([str(tmp_path / "out.nii.gz")] if command == "convert" else [])
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medseg {command}: error: {path}") and fragment in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, nothing changed


def test_cli_subprocess_has_no_traceback(tmp_path):
    path, _, _ = make_bad("truncated_gz", tmp_path)
    out = subprocess.run([sys.executable, "-m", "medseg.cli.main", "convert", str(path), str(tmp_path / "o.nrrd")],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.nrrd").exists()
