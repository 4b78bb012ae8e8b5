"""Makers of hostile files for tests/test_hostile_inputs.py and the fuzz pass: every file is built here, small.

Each maker writes into a folder and returns the path it made. Bombs are small on disk and declare gigabytes.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

GOOD_SHAPE = (20, 18, 12)
GOOD_AFFINE = np.diag([1.2, 1.1, 2.0, 1.0])


def good_image(seed: int = 0, shape=GOOD_SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 1, shape) + 2.0).astype(np.float32)


def write_nifti(path: Path, data: np.ndarray, affine=None, **header) -> Path:
    img = nib.Nifti1Image(data, GOOD_AFFINE if affine is None else affine)
    for key, value in header.items():
        img.header[key] = value
    nib.save(img, str(path))
    return path


def raw_nifti_header(shape, dtype=np.float32, *, pixdim=(1.0, 1.0, 1.0), sform=True) -> bytes:
    """352 bytes: a NIfTI-1 single-file header (and empty extension flag) declaring ``shape``/``dtype``."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr["pixdim"][1:4] = pixdim
    hdr["vox_offset"] = 352
    if sform:
        hdr.set_sform(np.diag([*[p or 1.0 for p in pixdim], 1.0]), code=1)
    return hdr.binaryblock + b"\0\0\0\0"


def nifti_gzip_bomb(path: Path, side: int = 1024) -> Path:
    """A .nii.gz of a few MB that inflates to ``side**3 * 4`` bytes (4 GiB at 1024): gzip members of zeros."""
    block = gzip.compress(b"\0" * (64 << 20), compresslevel=1)
    total = side ** 3 * 4
    with open(path, "wb") as fh:
        fh.write(gzip.compress(raw_nifti_header((side, side, side))))
        for _ in range(max(1, total // (64 << 20))):
            fh.write(block)
    return path


def nifti_huge_header(path: Path) -> Path:
    """A .nii (or .nii.gz) whose header declares 30000 x 30000 x 30000 float32 voxels, and no data."""
    head = raw_nifti_header((30000, 30000, 30000))
    path.write_bytes(gzip.compress(head) if path.name.endswith(".gz") else head)
    return path


def nrrd_bomb(path: Path) -> Path:
    data = gzip.compress(b"\0" * 4096)
    path.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4000 4000 4000\nencoding: gzip\n"
                     b"endian: little\nspace: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n\n"
                     + data)
    return path


def mha_bomb(path: Path) -> Path:
    data = zlib.compress(b"\0" * 4096)
    head = ("ObjectType = Image\nNDims = 3\nDimSize = 4000 4000 4000\nElementType = MET_FLOAT\n"
            f"CompressedData = True\nCompressedDataSize = {len(data)}\nElementSpacing = 1 1 1\n"
            "ElementDataFile = LOCAL\n")
    path.write_bytes(head.encode() + data)
    return path


def png_bytes(width: int, height: int, payload: bytes | None = None) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(payload if payload is not None else b"\0" * 256)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_bomb(path: Path) -> Path:
    path.write_bytes(png_bytes(60000, 60000))
    return path


def dicom_series(folder: Path, n: int = 4, **kwargs) -> Path:
    from test_io_dicom import write_series  # tests/ is on sys.path (pytest's prepend import mode)

    write_series(folder, [np.array([0, 0, 2.0 * k]) for k in range(n)], **kwargs)
    return folder


def dicom_huge_rows(folder: Path) -> Path:
    """One DICOM image whose header claims 60000 x 60000 pixels (the pixel data is tiny)."""
    import pydicom

    dicom_series(folder, 1)
    f = next(folder.iterdir())
    ds = pydicom.dcmread(f)
    ds.Rows, ds.Columns = 60000, 60000
    ds.save_as(f)
    return folder


def dicom_truncated(folder: Path) -> Path:
    dicom_series(folder, 4, rows=12, cols=10)
    f = sorted(folder.iterdir())[1]
    f.write_bytes(f.read_bytes()[:-60])
    return folder


def dicom_zero_spacing(folder: Path) -> Path:
    import pydicom

    dicom_series(folder, 3)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.PixelSpacing = ["0", "0"]
        ds.save_as(f)
    return folder


def dicom_seg_like(path: Path) -> Path:
    """A DICOM file with Modality SEG (no image): must be listed and skipped, never read as an image."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.Modality = generate_uid(), generate_uid(), "SEG"
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).Modality == "SEG"
    return path
