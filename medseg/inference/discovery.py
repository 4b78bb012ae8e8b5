"""Input discovery for batch prediction: every entry of an input folder classified, cases found, shards.

The input may mix kinds; each entry of the folder is classified on its own:

* an image file (any suffix of :data:`medseg.io.IMAGE_SUFFIXES`) -> one case named after the file, or nnU-Net
  channel naming ``CASE_0000.nii.gz``, ``CASE_0001...`` when every image file follows it and each case has exactly
  the model's channels 0..C-1;
* DICOM files directly in the folder -> one case per image series among them (named after the folder; with
  several series ``FOLDER_sN``, N the SeriesNumber); DICOM objects that are not images (SEG, RTSTRUCT, SR) are
  skipped;
* a sub-folder holding DICOM files -> one case (its series), named after the sub-folder;
* anything else (other files, folders without DICOM files, dangling links, link loops, FIFOs, hidden files,
  medseg temporaries) is skipped, with the reason.

``shard=(I, N)`` keeps the cases whose position in the sorted case list is ``I`` modulo ``N``, so N processes share
one folder with no coordination. :mod:`medseg.inference.batch` predicts what this module finds.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError, InputError
from medseg.io.atomic import TMP_MARKER
from medseg.io.registry import split_suffix

__all__ = ["CaseInput", "InputEntry", "Discovery", "discover_inputs", "discover_cases", "shard_cases", "parse_shard",
           "resolve_shard"]

log = logging.getLogger(__name__)

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")

@dataclass
class CaseInput:
    """One case to predict.

    Args:
        case_id: output name stem.
        images: one file per channel, or one DICOM series folder.
        kind: ``"file"`` or ``"dicom"``.
        series_uid: the series to read from ``images[0]`` (DICOM files lying directly in a folder that holds more).
        entries: the input entries (paths relative to the input) this case is made of.
    """

    case_id: str
    images: list[Path]
    kind: str = "file"
    series_uid: str | None = None
    entries: list[str] = field(default_factory=list)


@dataclass
class InputEntry:
    """One entry of the input (a file or folder directly in it, or a file inside a DICOM case folder).

    ``status`` is ``"predicted"``, ``"skipped"`` or ``"failed"`` (``"pending"`` until :func:`account_inputs`).
    """

    path: str
    kind: str
    status: str = "pending"
    case_id: str | None = None
    reason: str | None = None
    files: int | None = None


@dataclass
class Discovery:
    """The cases found under an input path and every entry of it."""

    root: Path
    cases: list[CaseInput]
    entries: list[InputEntry]

    def skipped(self) -> list[InputEntry]:
        """Entries that are no part of any case."""
        return [e for e in self.entries if e.case_id is None]


def _stem(path: Path) -> str | None:
    stem, suffix = split_suffix(path.name)
    return stem if suffix else None


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _is_dicom_file(path: Path) -> bool:
    """A regular file that is DICOM by suffix or by the ``DICM`` preamble (never opens a FIFO or device)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    return path.suffix.lower() == ".dcm" or _has_dicom_magic(path)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() or path.name
    except ValueError:
        return str(path)


def _link_problem(p: Path, root: Path) -> str | None:
    """Why a symbolic link cannot be followed (dangling, loop, or a folder that contains the input), else None."""
    if not p.is_symlink():
        return None
    try:
        os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"dangling symbolic link (its target {os.readlink(p)!r} does not exist)"
    target = p.resolve()
    if target.is_dir():
        here = root.resolve()
        if target == here or target in here.parents:
            return "symbolic link to a folder that contains the input (a loop)"
    return None


def _walk_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(regular files, other entries) below ``folder``; links to folders are not followed."""
    files, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        base = Path(dirpath)
        for d in dirnames:
            if (base / d).is_symlink():
                others.append(base / d)
        for name in filenames:
            p = base / name
            try:
                regular = stat.S_ISREG(os.stat(p).st_mode)
            except OSError:
                regular = False
            (files if regular else others).append(p)
    return sorted(files), sorted(others)


def _classify(p: Path, root: Path, exclude: set[Path]) -> tuple[str, str | None]:
    """``("image"|"dicom"|"folder"|"skip", reason)`` for a top-level entry."""
    problem = _link_problem(p, root)
    if problem:
        return "skip", problem
    if p.name.startswith(TMP_MARKER):
        return "skip", "temporary file of an interrupted medseg run"
    if p.name.startswith("."):
        return "skip", "hidden entry"
    try:
        mode = os.stat(p).st_mode
    except OSError as exc:
        return "skip", f"cannot be inspected ({exc.strerror})"
    if stat.S_ISDIR(mode):
        if p.resolve() in exclude:
            return "skip", "this run's output folder"
        return "folder", None
    if not stat.S_ISREG(mode):
        return "skip", "not a regular file (FIFO, socket or device)"
    if _stem(p) is not None:
        return "image", None
    if p.name.upper() == "DICOMDIR":
        return "skip", "DICOMDIR index (the series' files are read instead)"
    if _is_dicom_file(p):
        return "dicom", None
    suffix = "".join(p.suffixes[-2:]) if p.suffixes else ""
    return "skip", f"not an image (unsupported file type {suffix or 'without suffix'!r})"


def _dicom_groups(files: list[Path], root: Path, entries: dict[str, InputEntry]) -> dict[str, list[tuple[Path, Any]]]:
    """Image series among DICOM files lying directly in the input; other objects are marked skipped."""
    from medseg.io.dicom import _is_image, _read_header

    groups: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    for f in files:
        entry = entries[_rel(f, root)]
        ds = _read_header(f)
        if ds is None:
            entry.status, entry.reason = "skipped", "not readable as DICOM"
            continue
        if "SeriesInstanceUID" not in ds:
            entry.status, entry.reason = "skipped", "DICOM file without SeriesInstanceUID"
            continue
        is_img, kind = _is_image(ds)
        if not is_img:
            modality = str(ds.get("Modality", "") or "?")
            entry.status, entry.reason = "skipped", f"DICOM {modality} object ({kind}), not an image"
            continue
        groups[str(ds.SeriesInstanceUID)].append((f, ds))
    return groups


def discover_inputs(path: str | Path, in_channels: int = 1, *, exclude: Sequence[str | Path] = ()) -> Discovery:
    """Find the cases under an input path and classify every entry of it (see the module docstring).

    Args:
        path: a file, or a folder mixing image files, DICOM files and DICOM series folders.
        in_channels: the model's input channels (decides whether ``_0000`` names are channels).
        exclude: folders never read as input (the run's output folder when it lies inside the input).

    Returns:
        The :class:`Discovery`: cases sorted by ``case_id``, entries sorted by path.

    Raises:
        InputError: the path does not exist, holds no cases (the message says what it holds), or two cases would
            share an output name.
    """
    root = Path(path)
    if not root.exists():
        problem = _link_problem(root, root.parent) if root.is_symlink() else None
        raise InputError(root, problem or "does not exist", "a NIfTI file, a folder of cases or a DICOM series folder")
    if root.is_file():
        stem = _stem(root)
        if stem is None:
            if _is_dicom_file(root):
                raise InputError(root, "is a single DICOM file", "the folder holding its DICOM series")
            raise InputError(root, "has an unknown image type", "a .nii/.nii.gz/.nrrd/.mha file or a folder")
        m = _CHANNEL.match(stem)
        case_id = m.group("case") if m and in_channels == 1 and m.group("ch") == "0000" else stem
        entry = InputEntry(root.name, "file", case_id=case_id)
        return Discovery(root, [CaseInput(case_id, [root], entries=[root.name])], [entry])
    if not root.is_dir():
        raise InputError(root, "is not a regular file or folder", "a NIfTI file, a folder of cases or a DICOM folder")
    excluded = {Path(p).resolve() for p in exclude}
    try:
        children = sorted(root.iterdir())
    except OSError as exc:
        raise InputError(root, f"cannot be listed ({exc.strerror})", "a readable folder") from None
    entries: dict[str, InputEntry] = {}
    images, dicoms, folders = [], [], []
    for p in children:
        what, reason = _classify(p, root, excluded)
        kind = "symlink" if p.is_symlink() and what == "skip" else ("folder" if what == "folder" else "file")
        entry = entries[_rel(p, root)] = InputEntry(_rel(p, root), kind)
        if what == "skip":
            entry.status, entry.reason = "skipped", reason
        elif what == "image":
            images.append(p)
        elif what == "dicom":
            dicoms.append(p)
        else:
            folders.append(p)
    cases = _group_channels(images, in_channels, root)
    groups = _dicom_groups(dicoms, root, entries)
    numbers = [str(items[0][1].get("SeriesNumber", "") or "") for items in groups.values()]
    for i, (uid, items) in enumerate(sorted(groups.items(), key=lambda kv: sorted(kv[1])[0][0].name)):
        if len(groups) == 1:
            cid = root.name
        else:
            num = str(items[0][1].get("SeriesNumber", "") or "")
            cid = f"{root.name}_s{num}" if num and numbers.count(num) == 1 else f"{root.name}_{i + 1}"
        cases.append(CaseInput(cid, [root], "dicom", series_uid=uid, entries=[_rel(f, root) for f, _ in items]))
    for sub in folders:
        entry = entries[_rel(sub, root)]
        files, others = _walk_files(sub)
        entry.files = len(files) + len(others)
        if any(_is_dicom_file(f) for f in files):
            cases.append(CaseInput(sub.name, [sub], "dicom", entries=[entry.path]))
            continue
        n_img = sum(_stem(f) is not None for f in files)
        what = f"{len(files)} file(s)" + (f", {n_img} of them image files" if n_img else "")
        entry.status = "skipped"
        entry.reason = (f"folder without DICOM files ({what}); sub-folders are read as DICOM series only"
                        + (" (put image files directly in the input folder)" if n_img else ""))
    by_entry = {e: c.case_id for c in cases for e in c.entries}
    for path_, cid in by_entry.items():
        entries[path_].case_id = cid
    if not cases:
        listing = "; ".join(f"{e.path} ({e.reason})" for e in list(entries.values())[:5])
        more = f" and {len(entries) - 5} more" if len(entries) > 5 else ""
        found = f"found {len(entries)} entries: {listing}{more}" if entries else "it is empty"
        raise InputError(root, f"holds no images ({found})",
                         "image files (.nii.gz, .nrrd, .mha, ...), CASE_0000.nii.gz channel files, DICOM files or "
                         "DICOM series folders")
    seen: dict[str, CaseInput] = {}
    for c in cases:
        if c.case_id in seen:
            raise InputError(root, f"has two inputs for case {c.case_id!r} ({seen[c.case_id].entries[0]}, "
                                   f"{c.entries[0]})", "one input per case name")
        seen[c.case_id] = c
    return Discovery(root, sorted(cases, key=lambda c: c.case_id), sorted(entries.values(), key=lambda e: e.path))


def discover_cases(path: str | Path, in_channels: int = 1) -> list[CaseInput]:
    """The cases under an input path (:func:`discover_inputs` without the entry accounting).

    Raises:
        InputError: the path does not exist, holds no cases, or two cases would share an output name.
    """
    return discover_inputs(path, in_channels).cases


def _group_channels(files: list[Path], in_channels: int, root: Path | None = None) -> list[CaseInput]:
    """nnU-Net channel naming when every file has it and every case has exactly channels 0..C-1."""
    def rel(p: Path) -> str:
        return _rel(p, root) if root is not None else p.name

    groups: dict[str, dict[int, Path]] = {}
    for f in files:
        m = _CHANNEL.match(_stem(f) or "")
        if not m:
            groups = {}
            break
        groups.setdefault(m.group("case"), {})[int(m.group("ch"))] = f
    if groups and all(sorted(g) == list(range(in_channels)) for g in groups.values()):
        return [CaseInput(cid, [g[i] for i in range(in_channels)], entries=[rel(g[i]) for i in range(in_channels)])
                for cid, g in groups.items()]
    return [CaseInput(_stem(f) or f.name, [f], entries=[rel(f)]) for f in files]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` (0 <= I < N) -> ``(I, N)``; None -> None.

    Raises:
        ConfigError: malformed text.
    """
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise ConfigError("--shard", text, "I/N with 0 <= I < N, e.g. 0/4 (SLURM: $SLURM_ARRAY_TASK_ID/N)")
    return int(m.group(1)), int(m.group(2))


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name)
    if text is None or not str(text).strip():
        return None
    try:
        return int(str(text).strip())
    except ValueError:
        raise ConfigError(name, text, "an integer (as SLURM and torchrun set it)") from None


def resolve_shard(text: str | None, env: Mapping[str, str] | None = None) -> tuple[tuple[int, int] | None, str]:
    """``--shard``: ``"I/N"``, ``"auto"`` or None -> ``(shard, where it came from)``.

    ``auto`` takes the shard from the scheduler: a SLURM job array (``SLURM_ARRAY_TASK_ID`` counted from
    ``SLURM_ARRAY_TASK_MIN`` in steps of ``SLURM_ARRAY_TASK_STEP``, out of ``SLURM_ARRAY_TASK_COUNT``), else
    torchrun's ``RANK`` of ``WORLD_SIZE`` (when ``WORLD_SIZE`` > 1), else no sharding.

    Args:
        text: the option's value.
        env: the environment (default ``os.environ``).

    Returns:
        ``(None or (I, N), source)``, source e.g. ``"SLURM_ARRAY_TASK_ID=5 of --array=1-8"`` or ``"--shard 0/4"``.

    Raises:
        ConfigError: malformed text, or scheduler variables that do not name one shard of a contiguous array.
    """
    if text is None or str(text).strip().lower() != "auto":
        shard = parse_shard(text)
        return shard, "none" if shard is None else f"--shard {shard[0]}/{shard[1]}"
    env = os.environ if env is None else env
    task = _env_int(env, "SLURM_ARRAY_TASK_ID")
    if task is not None:
        lo = _env_int(env, "SLURM_ARRAY_TASK_MIN") or 0
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") or 1
        count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        hi = _env_int(env, "SLURM_ARRAY_TASK_MAX")
        if count is None:
            if hi is None:
                raise ConfigError("--shard auto", f"SLURM_ARRAY_TASK_ID={task} without SLURM_ARRAY_TASK_COUNT",
                                  "a SLURM job array (sbatch --array), or --shard I/N")
            count = (hi - lo) // step + 1
        index, off = divmod(task - lo, step)
        if off or not 0 <= index < count:
            raise ConfigError("--shard auto", f"SLURM_ARRAY_TASK_ID={task} (min {lo}, step {step}, count {count})",
                              "a contiguous array such as --array=0-7 or 1-8:1 (or --shard I/N from your own "
                              "numbering)")
        return (index, count), f"SLURM_ARRAY_TASK_ID={task} of {count} tasks from {lo}"
    world = _env_int(env, "WORLD_SIZE")
    if world is not None and world > 1:
        rank = _env_int(env, "RANK")
        if rank is None or not 0 <= rank < world:
            raise ConfigError("--shard auto", f"RANK={env.get('RANK')} of WORLD_SIZE={world}",
                              "0 <= RANK < WORLD_SIZE, as torchrun sets them")
        return (rank, world), f"RANK={rank} of WORLD_SIZE={world}"
    return None, "auto: no SLURM array or torchrun world, one shard"


def shard_cases(cases: Sequence[CaseInput], shard: tuple[int, int] | None) -> list[CaseInput]:
    """The cases of shard ``(I, N)``: positions ``I, I + N, ...`` of the sorted list (all when None)."""
    ordered = sorted(cases, key=lambda c: c.case_id)
    if shard is None:
        return ordered
    i, n = shard
    return ordered[i::n]
