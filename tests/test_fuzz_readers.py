"""Fuzz pass over the readers: hypothesis-driven byte and field mutation of real headers (slow set).

Seeds are small valid files written here (NIfTI-1 .nii and .nii.gz, NRRD with raw and gzip data, MetaImage, PNG,
a DICOM slice). Each example mutates one seed (byte overwrites, a truncation, an inserted run, or a header field
replaced by a hostile value) and reads it with :func:`medseg.io.read_volume` under a small voxel limit. The property:
the read either returns a Volume within the limit with a finite, invertible affine, or raises a one-line
:class:`~medseg.errors.MedsegError` naming the file; any other exception, a multi-line message or an allocation past
the limit is a finding. docs/fuzzing.md records what the pass found.

Bounded: ``MEDSEG_FUZZ_EXAMPLES`` examples per seed (default 300), each with a 10 s deadline. To find a mutant that
hangs a reader (the deadline cannot interrupt C code), set ``MEDSEG_FUZZ_LAST=/tmp/last``: each text-header mutant
is copied there before it is read.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import _hostile as H
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from medseg.errors import MedsegError  # noqa: E402
from medseg.io import Volume, read_volume, write_volume  # noqa: E402
from medseg.io.guard import ENV_VAR  # noqa: E402

pytestmark = pytest.mark.slow

LIMIT = 2_000_000
EXAMPLES = int(os.environ.get("MEDSEG_FUZZ_EXAMPLES", "300"))
HOSTILE_VALUES = [b"0", b"-1", b"-0", b"1e308", b"-1e308", b"nan", b"inf", b"99999999999", b"4294967297", b"", b"a",
                  b"1 1", b"(0,0,0)", b"\x00", b"65535", b"2147483647"]
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=10), database=None, derandomize=False,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.function_scoped_fixture])


def _seed_files(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    vol = Volume((rng.integers(0, 1000, (6, 5, 4))).astype(np.int16)[None], np.diag([1.5, 0.8, 2.0, 1.0]))
    out = {}
    for name in ("seed.nii", "seed.nii.gz", "seed.nrrd", "seed.mha"):
        write_volume(vol, folder / name)
        out[name] = folder / name
    raw = folder / "raw.nrrd"  # an uncompressed NRRD: its header is plain text at the start
    write_volume(vol, raw, compress=False)
    out["raw.nrrd"] = raw
    png = folder / "seed.png"
    png.write_bytes(H.png_bytes(8, 8, bytes(range(72))))
    out["seed.png"] = png
    dcm_dir = H.dicom_series(folder / "dcm", 1, rows=6, cols=5)
    out["dcm"] = next(dcm_dir.iterdir())
    return out


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Path]:
    return _seed_files(tmp_path_factory.mktemp("seeds"))


@pytest.fixture(autouse=True)
def small_limit(monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(LIMIT))


@pytest.fixture(scope="module", autouse=True)
def address_space_limit():
    """2 GiB of address space beyond what the process has: an allocation the guard should have refused fails."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    limit = vm + (2 << 30)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@st.composite
def mutations(draw, size: int, header: int):
    """A list of edits of a ``size``-byte file whose first ``header`` bytes are the header."""
    edits = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["byte", "byte", "run", "truncate", "insert"]))
        pos = draw(st.integers(0, max(0, min(size, header) - 1))) if draw(st.booleans()) or kind == "truncate" \
            else draw(st.integers(0, max(0, size - 1)))
        if kind == "byte":
            edits.append(("byte", pos, draw(st.integers(0, 255))))
        elif kind == "run":
            edits.append(("run", pos, draw(st.sampled_from([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x00", b"\xff" * 8,
                                                             b"\x80\x00\x00\x00", b"\x7f\x7f\x7f\x7f"]))))
        elif kind == "truncate":
            edits.append(("truncate", pos, None))
        else:
            edits.append(("insert", pos, draw(st.binary(min_size=1, max_size=16))))
    return edits


def _apply(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for kind, pos, value in edits:
        pos = min(pos, len(buf))
        if kind == "byte" and pos < len(buf):
            buf[pos] = value
        elif kind == "run":
            buf[pos:pos + len(value)] = value
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = value
    return bytes(buf)


def _check(path: Path) -> None:
    try:
        vol = read_volume(path)
    except MedsegError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.startswith(str(path)), msg
        assert "needs more memory" not in msg, f"an allocation the size guard should have refused: {msg}"
        return
    assert vol.array.size <= LIMIT, f"{vol.array.shape} read past the limit of {LIMIT}"
    assert vol.array.dtype.kind in "biuf"
    assert np.all(np.isfinite(vol.affine)) and abs(np.linalg.det(vol.affine[:3, :3])) > 0


def _fuzz_file(seed: Path, header: int, data: st.DataObject, *, regzip: bool = False) -> None:
    raw = seed.read_bytes()
    if regzip:
        raw = gzip.decompress(raw)
    edits = data.draw(mutations(len(raw), header))
    mutated = _apply(raw, edits)
    work = Path(tempfile.mkdtemp())
    try:
        target = work / seed.name
        target.write_bytes(gzip.compress(mutated, 1) if regzip else mutated)
        _check(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# header sizes: NIfTI-1 352 bytes; the DICOM header ends where its pixel data begins
@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_nifti_header(seeds, data):
    _fuzz_file(seeds["seed.nii"], 352, data)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_nifti_gz_inflated_header(seeds, data):
    _fuzz_file(seeds["seed.nii.gz"], 352, data, regzip=True)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_nifti_gz_stream(seeds, data):
    _fuzz_file(seeds["seed.nii.gz"], 64, data)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_mha_bytes(seeds, data):
    raw = seeds["seed.mha"].read_bytes()
    _fuzz_file(seeds["seed.mha"], raw.index(b"ElementDataFile") + 30, data)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_png_bytes(seeds, data):
    _fuzz_file(seeds["seed.png"], 40, data)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_dicom_bytes(seeds, data):
    seed = seeds["dcm"]
    raw = seed.read_bytes()
    edits = data.draw(mutations(len(raw), len(raw) - 60))
    work = Path(tempfile.mkdtemp())
    try:
        (work / "s").mkdir()
        (work / "s" / seed.name).write_bytes(_apply(raw, edits))
        _check(work / "s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


_FIELD = re.compile(rb"^([A-Za-z ]+)(:=|:| =) ?(.*)$", re.M)


def _fuzz_text_header(seed: Path, data: st.DataObject) -> None:
    raw = seed.read_bytes()
    end = raw.index(b"\n\n") if seed.suffix == ".nrrd" else raw.index(b"ElementDataFile")
    head, body = raw[:end], raw[end:]
    fields = list(_FIELD.finditer(head))
    for _ in range(data.draw(st.integers(1, 3))):
        m = data.draw(st.sampled_from(fields))
        value = data.draw(st.sampled_from(HOSTILE_VALUES))
        parts = m.group(3).split(b" ")
        if len(parts) > 1 and data.draw(st.booleans()):
            parts[data.draw(st.integers(0, len(parts) - 1))] = value
            value = b" ".join(parts)
        head = head.replace(m.group(0), m.group(1) + m.group(2) + b" " + value, 1)
        fields = list(_FIELD.finditer(head))
    work = Path(tempfile.mkdtemp())
    try:
        target = work / seed.name
        target.write_bytes(head + body)
        if os.environ.get("MEDSEG_FUZZ_LAST"):  # keep the mutant being read (to find one that hangs a reader)
            Path(os.environ["MEDSEG_FUZZ_LAST"] + seed.suffix).write_bytes(head + body)
        _check(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_nrrd_fields(seeds, data):
    _fuzz_text_header(seeds["raw.nrrd"], data)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_nrrd_gzip_fields(seeds, data):
    _fuzz_text_header(seeds["seed.nrrd"], data)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_mha_fields(seeds, data):
    _fuzz_text_header(seeds["seed.mha"], data)


_NIFTI_FIELDS = {"dim": (40, "h", 8), "datatype": (70, "h", 1), "bitpix": (72, "h", 1), "pixdim": (76, "f", 8),
                 "vox_offset": (108, "f", 1), "scl_slope": (112, "f", 1), "scl_inter": (116, "f", 1),
                 "qform_code": (252, "h", 1), "sform_code": (254, "h", 1), "quatern": (256, "f", 6),
                 "srow": (280, "f", 12)}
_HOSTILE_NUMBERS = [0, -1, 1, 2, 7, 8, 32767, -32768, 1e30, -1e30, float("nan"), float("inf"), 1e-30, 65535]


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_nifti_fields(seeds, data):
    """Typed edits of the NIfTI-1 header fields (dims, datatype, pixdim, offsets, scaling, qform/sform)."""
    import struct

    raw = bytearray(seeds["seed.nii"].read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        name = data.draw(st.sampled_from(sorted(_NIFTI_FIELDS)))
        offset, code, count = _NIFTI_FIELDS[name]
        i = data.draw(st.integers(0, count - 1))
        value = data.draw(st.sampled_from(_HOSTILE_NUMBERS))
        size = struct.calcsize(code)
        if code == "h":
            value = int(max(-32768, min(32767, value))) if np.isfinite(value) else 0
        struct.pack_into("<" + code, raw, offset + i * size, value)
    work = Path(tempfile.mkdtemp())
    try:
        target = work / "f.nii"
        target.write_bytes(bytes(raw))
        _check(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
