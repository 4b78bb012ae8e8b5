"""Guards every reader runs before it allocates: the declared size against a memory limit, and the pixel data a
file declares against what it holds.

Size limit. A file's header declares its grid (and channels) before any voxel is decoded; a reader calls
:func:`check_voxels` with that declaration, so an image whose header claims a huge grid, or a small ``.nii.gz``
that would inflate to gigabytes (a decompression bomb), is refused in one line before anything is allocated or
decompressed. The limit counts voxel values (grid x channels). By default it is half of the memory available to
this process (the least of the free memory, the cgroup's limit and the address-space limit ``ulimit -v``) at
:data:`BYTES_PER_VOXEL` bytes a value: a float32 copy and the working copies that reading, reorienting and
resampling make. ``--max-voxels N`` on any command, ``max_voxels:`` in a pipeline YAML or the environment variable
``MEDSEG_MAX_VOXELS`` set it explicitly (:func:`set_max_voxels`; child processes inherit it).
:func:`check_resampled` applies the same limit to the grid an image has at a plan's target spacing, before the
resampler allocates it.

Pixel data. :func:`check_dicom_pixel_data` compares the pixel data length of every file of a DICOM series with
what Rows x Columns x SamplesPerPixel x BitsAllocated declares (native transfer syntaxes), so that a truncated
series is refused instead of being decoded with zero-filled or shifted slices.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.errors import ConfigError, InputError

__all__ = ["ENV_VAR", "BYTES_PER_VOXEL", "MEMORY_FRACTION", "SizeLimitError", "available_memory", "max_voxels",
           "set_max_voxels", "parse_max_voxels", "check_voxels", "check_resampled", "check_dicom_pixel_data",
           "raw_dicom_element", "limit_text"]

log = logging.getLogger(__name__)

#: Environment variable holding an explicit limit (voxel values); set by :func:`set_max_voxels`.
ENV_VAR = "MEDSEG_MAX_VOXELS"
#: Bytes of memory budgeted per voxel value for the default limit.
BYTES_PER_VOXEL = 16
#: Fraction of the available memory the default limit may use.
MEMORY_FRACTION = 0.5


class SizeLimitError(InputError):
    """An image (or its grid at a plan's spacing) is larger than the voxel limit."""


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_available() -> int | None:
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is None:  # cgroup v1
        limit = _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        used = _read_int("/sys/fs/cgroup/memory/memory.usage_in_bytes")
    if limit is None or limit >= 1 << 60:
        return None
    return max(0, limit - (used or 0))


def _address_space_available() -> int | None:
    try:
        import resource  # Unix only
    except ImportError:
        return None
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ValueError, OSError):
        return None
    if soft in (resource.RLIM_INFINITY, -1) or soft <= 0:
        return None
    vm = 0
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    vm = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return max(0, soft - vm)


def available_memory() -> tuple[int, str]:
    """Bytes of memory this process can still allocate, and where the number comes from.

    Returns:
        ``(bytes, source)``: the least of the free memory (``MemAvailable``), the cgroup's remaining limit and the
        remaining address space under ``ulimit -v``.
    """
    candidates = [(v, src) for v, src in ((_meminfo_available(), "available memory"),
                                          (_cgroup_available(), "memory left under the cgroup limit"),
                                          (_address_space_available(), "address space left under ulimit -v"))
                  if v is not None]
    if not candidates:
        return 8 << 30, "assumed memory"
    return min(candidates)


def _explicit_limit() -> int | None:
    text = os.environ.get(ENV_VAR)
    if not text:
        return None
    try:
        return parse_max_voxels(text)
    except ConfigError:
        log.warning("ignoring %s=%r: not a positive number of voxels", ENV_VAR, text)
        return None


def max_voxels() -> int:
    """The voxel limit in force: the explicit one (:func:`set_max_voxels`, ``MEDSEG_MAX_VOXELS``), else the default
    computed from the memory available now."""
    explicit = _explicit_limit()
    if explicit is not None:
        return explicit
    avail, _ = available_memory()
    return max(1, int(avail * MEMORY_FRACTION / BYTES_PER_VOXEL))


def limit_text() -> str:
    """How the limit in force was set, for messages."""
    explicit = _explicit_limit()
    if explicit is not None:
        return f"the limit of {explicit:.3g} voxels set by --max-voxels / max_voxels / {ENV_VAR}"
    avail, source = available_memory()
    limit = max(1, int(avail * MEMORY_FRACTION / BYTES_PER_VOXEL))
    return (f"the limit of {limit:.3g} voxels ({MEMORY_FRACTION:.0%} of the {avail / 2**30:.3g} GiB of {source}, "
            f"at {BYTES_PER_VOXEL} bytes a voxel)")


def _round_up(n: float) -> str:
    """``1073741824`` -> ``"1.08e+09"``: three digits, rounded up, so that passing it admits ``n``."""
    if n < 1000:
        return str(int(math.ceil(n)))
    exp = int(math.floor(math.log10(n))) - 2
    return f"{math.ceil(n / 10 ** exp) * 10 ** exp:.3g}"


def parse_max_voxels(value: object) -> int:
    """``2e9``, ``"2e9"``, ``"2_000_000_000"``, ``"500M"``, ``"2G"`` -> a positive int.

    Raises:
        ConfigError: anything else.
    """
    if isinstance(value, bool):
        raise ConfigError("max_voxels", value, "a positive number of voxels, e.g. 2e9 or 500M")
    if isinstance(value, (int, float, np.integer, np.floating)):
        number = float(value)
    else:
        text = str(value).strip().replace("_", "").replace(",", "")
        scale = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}.get(text[-1:].upper(), 1.0)
        if scale != 1.0:
            text = text[:-1]
        try:
            number = float(text) * scale
        except ValueError:
            raise ConfigError("max_voxels", value, "a positive number of voxels, e.g. 2e9 or 500M") from None
    if not np.isfinite(number) or number < 1:
        raise ConfigError("max_voxels", value, "a positive number of voxels, e.g. 2e9 or 500M")
    return int(number)


def set_max_voxels(value: object | None) -> None:
    """Set the limit for this process and the processes it starts (None: back to the memory-based default)."""
    if value is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = str(parse_max_voxels(value))


def _fmt_grid(shape: Sequence[int]) -> str:
    return " x ".join(str(int(s)) for s in shape)


def check_voxels(path: str | Path | None, shape: Sequence[int], channels: int = 1, *, what: str = "declares") -> None:
    """Refuse a grid whose voxel values (``prod(shape) * channels``) exceed :func:`max_voxels`.

    Args:
        path: the file, for the message.
        shape: the grid the header declares.
        channels: components per voxel (channels, RGB samples, time points).
        what: the verb of the message (``"declares"``).

    Raises:
        SizeLimitError: one line naming the declared size and the limit.
    """
    dims = [int(s) for s in shape]
    if any(s < 0 for s in dims):
        raise InputError(path, f"{what} a negative image size {_fmt_grid(dims)}", "a valid image header")
    n = int(np.prod([float(s) for s in dims], dtype=np.float64) * max(1, int(channels)))
    limit = max_voxels()
    if n > limit:
        chan = f" with {channels} channels" if channels > 1 else ""
        raise SizeLimitError(path, f"{what} a {_fmt_grid(dims)} grid{chan} ({n:.3g} voxels), more than "
                             f"{limit_text()}", f"a smaller image, or --max-voxels {_round_up(n)} (pipeline YAML: max_voxels)"
                             " where the memory is there")


def check_resampled(path: str | Path | None, shape: Sequence[int], spacing: Sequence[float],
                    target: Sequence[float | None], channels: int = 1, *, purpose: str = "") -> tuple[int, ...]:
    """Refuse an image whose grid at the ``target`` spacing would exceed the voxel limit.

    Args:
        path: the image, for the message.
        shape: its grid, in the axis order of ``target``.
        spacing: its voxel size (mm), same order.
        target: the plan's spacing (None: the axis is kept).
        channels: values held per voxel at the target spacing (e.g. image channels + classes).
        purpose: what the grid is for, e.g. ``"for configuration 3d_fullres"``.

    Returns:
        The resampled grid.

    Raises:
        SizeLimitError: the resampled grid is too large, or the spacing is zero, negative or not finite.
    """
    out = []
    for n, sp, t in zip(shape, spacing, target):
        if t is None:
            out.append(int(n))
            continue
        sp, t = float(sp), float(t)
        if not (np.isfinite(sp) and sp > 0 and np.isfinite(t) and t > 0):
            raise InputError(path, f"has voxel size {sp:g} mm against a target spacing of {t:g} mm",
                             "positive, finite voxel sizes")
        out.append(max(1, int(round(n * sp / t))))
    n = float(np.prod([float(v) for v in out])) * max(1, int(channels))
    limit = max_voxels()
    if n > limit:
        sp_txt = " x ".join(f"{float(s):.4g}" for s in spacing)
        tg_txt = " x ".join("-" if t is None else f"{float(t):.4g}" for t in target)
        raise SizeLimitError(path, f"is a {_fmt_grid(shape)} grid at {sp_txt} mm; resampled to the plan spacing "
                             f"{tg_txt} mm{(' ' + purpose) if purpose else ''} it would be {_fmt_grid(out)} "
                             f"({n:.3g} voxel values), more than {limit_text()}",
                             f"an image with a plausible voxel size (check its header), or --max-voxels "
                             f"{_round_up(n)} where the memory is there")
    return tuple(out)


# ------------------------------------------------------------------------------------------------- DICOM
_NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def _native_pixel_bytes(ds) -> int | None:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError, KeyError):
        return None
    if bits == 1:
        return (rows * cols * spp * frames + 7) // 8
    return rows * cols * spp * frames * ((bits + 7) // 8)


def raw_dicom_element(ds, tag):
    """The element ``tag`` of ``ds`` as stored, without reading a deferred value (None when absent)."""
    from pydicom.tag import Tag

    try:
        return ds.get_item(Tag(tag), keep_deferred=True)
    except TypeError:  # pydicom < 3 has no keep_deferred
        return ds._dict.get(Tag(tag))


def check_dicom_pixel_data(files: Sequence[str | Path], where: str | Path) -> None:
    """Check a DICOM series before decoding: its size against the limit, and every file's pixel data length.

    Args:
        files: the series' files in slice order (single-frame images).
        where: the folder (or file), for the size message.

    Raises:
        SizeLimitError: Rows x Columns x slices x SamplesPerPixel is more than the limit.
        InputError: a file without pixel data, or whose native pixel data is shorter than its header declares
            (a truncated file).
    """
    import pydicom

    files = [Path(f) for f in files]
    if not files:
        return
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    try:
        grid = (int(first.Columns), int(first.Rows), len(files))
        spp = int(first.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise InputError(files[0], "has no valid Rows/Columns", "a DICOM image") from None
    check_voxels(where, grid, spp)
    for f in files:
        try:
            ds = pydicom.dcmread(f, defer_size=1024)
        except Exception as exc:  # pydicom raises many types for a damaged file
            raise InputError(f, f"cannot be read as DICOM ({type(exc).__name__})", "a readable DICOM image") from None
        elem = None
        for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):  # PixelData, FloatPixelData, DoubleFloatPixelData
            elem = elem or raw_dicom_element(ds, tag)
        if elem is None:
            raise InputError(f, "has no pixel data", "a DICOM image with PixelData")
        file_meta = getattr(ds, "file_meta", None)
        syntax = str((file_meta.get("TransferSyntaxUID") if file_meta is not None else None) or "")
        length = getattr(elem, "length", None)
        tell = getattr(elem, "value_tell", None)
        if length is not None and length != 0xFFFFFFFF and tell is not None:
            held = max(0, os.path.getsize(f) - int(tell))
            if held < length:  # the decoder would allocate what the length field claims (found by fuzzing)
                raise InputError(f, f"pixel data is truncated: its length field declares {length} bytes, the file "
                                 f"holds {held}", "complete DICOM files (copy the series again)")
        if syntax and syntax not in _NATIVE_SYNTAXES:
            continue  # encapsulated (compressed) data: the decoder reports damage
        expected = _native_pixel_bytes(ds)
        if expected is None or length is None or length == 0xFFFFFFFF:
            continue
        held = length if tell is None else max(0, min(length, os.path.getsize(f) - int(tell)))
        if held < expected:
            raise InputError(f, f"pixel data is truncated: {held} bytes where Rows x Columns x SamplesPerPixel x "
                             f"BitsAllocated declares {expected}", "complete DICOM files (copy the series again)")
