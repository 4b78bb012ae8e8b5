"""Model packages: one zip with the model record, weights-only checkpoints, a model card and a SHA-256 manifest.

Layout of ``model.zip`` (the layout of a run folder, reduced to what prediction needs)::

    MANIFEST.json                 {"format": "medseg-model", "name", "files": {path: {"sha256", "size"}}}
    model.json  plan.json  postprocessing.json  crossval_summary.json
    MODEL_CARD.md  model_card.json
    fold_K/checkpoint_best.pt     {"network": {name, kwargs}, "state_dict"} only (no optimiser, no EMA, no cache)
    onnx/fold_K.onnx              optional (``--onnx``), onnx/fold_K.int8.onnx optional (``--int8``)

Unpacking is all or nothing: every entry is checked (a relative path without ``..``, a regular file, listed in
the manifest with its size, the sizes within a limit) and hashed before anything is written, the files are
written into a temporary folder beside the target and hashed again while written, and that folder is renamed
into place only when every hash matched. A refused package leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from medseg.deploy.runfolder import CHECKPOINT, ONNX_DIR, RunFolder
from medseg.errors import ConfigError, InputError
from medseg.io.atomic import TMP_MARKER, atomic_path

__all__ = ["export_package", "verify_package", "unpack_package", "install_package", "resolve_model",
           "models_dir", "cache_dir", "PACKAGE_FORMAT", "DEFAULT_SIZE_LIMIT"]

log = logging.getLogger(__name__)

PACKAGE_FORMAT = "medseg-model"
MANIFEST = "MANIFEST.json"
#: Largest total unpacked size accepted by default (bytes); ``size_limit=`` raises it.
DEFAULT_SIZE_LIMIT = 4 * 2**30
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RECORDS = ("model.json", "plan.json", "postprocessing.json", "crossval_summary.json")
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)  # fixed entry times: the same run gives the same bytes


def models_dir() -> Path:
    """Where ``medseg install-model`` puts models: ``$MEDSEG_MODELS`` or ``~/.local/share/medseg/models``."""
    env = os.environ.get("MEDSEG_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".local" / "share" / "medseg" / "models"


def cache_dir() -> Path:
    """Where ``medseg predict -m model.zip`` unpacks packages: ``$XDG_CACHE_HOME/medseg/packages``
    (default ``~/.cache/medseg/packages``), one folder per package content hash."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "medseg" / "packages"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ writing
def _weights_only(path: Path) -> bytes:
    import torch

    from medseg.runtime import load_checkpoint

    ckpt = load_checkpoint(path)  # weights_only=True; one-line InputError for foreign files
    if "network" not in ckpt:
        raise InputError(path, "records no network", 'a checkpoint with {"network": {"name", "kwargs"}}')
    slim = {"network": ckpt["network"], "state_dict": ckpt["state_dict"]}
    if "configuration" in ckpt:
        slim["configuration"] = ckpt["configuration"]
    buf = io.BytesIO()
    torch.save(slim, buf)
    return buf.getvalue()


def export_package(run_dir: str | Path, output: str | Path, *, folds: Sequence[int] | None = None,
                   name: str | None = None, onnx: bool = False, int8: bool = False,
                   calibration_cases: int = 8) -> dict[str, Any]:
    """Write a model package of a run folder.

    Args:
        run_dir: the run folder (``medseg crossval``).
        output: the ``.zip`` to write (atomically).
        folds: folds to include (default: the run's).
        name: package name (default: the pipeline name); letters, digits, ``._-``.
        onnx: also include ``onnx/fold_K.onnx`` (exported and parity-checked here).
        int8: also include ``onnx/fold_K.int8.onnx``, statically quantised with calibration windows from the
            run's training cases (needs the training data set; implies ``onnx``).
        calibration_cases: training cases of each fold used for INT8 calibration.

    Returns:
        The manifest written into the package (with ``export`` reports when ONNX files were added).

    Raises:
        InputError: the run folder lacks records or checkpoints.
        ConfigError: an invalid name or output path.
    """
    from medseg.deploy.card import build_card, render_card

    run = RunFolder(Path(run_dir))
    out = Path(output)
    if out.suffix != ".zip":
        raise ConfigError("-o", str(out), "a path ending in .zip")
    folds = run.folds(list(folds) if folds else None)
    name = name or str(run.model.get("pipeline") or run.config.get("name") or run.root.name)
    if not _NAME.match(name):
        raise ConfigError("--name", name, "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    files: dict[str, bytes] = {}
    for rec in _RECORDS:
        if (run.root / rec).is_file():
            files[rec] = (run.root / rec).read_bytes()
    import dataclasses

    record = dataclasses.replace(run.record, folds=sorted(int(f) for f in folds))
    files["model.json"] = json.dumps(record.to_dict(), indent=2).encode()
    for f in folds:
        files[f"fold_{f}/{CHECKPOINT}"] = _weights_only(run.checkpoint(f))
    card = build_card(run, folds, name)
    files["model_card.json"] = json.dumps(card, indent=2).encode()
    files["MODEL_CARD.md"] = render_card(card).encode()
    reports: dict[str, Any] = {}
    if onnx or int8:
        reports = _onnx_files(run, folds, files, int8=int8, calibration_cases=calibration_cases)
    manifest = {"format": PACKAGE_FORMAT, "format_version": 1, "name": name, "folds": list(folds),
                "files": {p: {"sha256": _sha256(b), "size": len(b)} for p, b in sorted(files.items())}}
    if reports:
        manifest["export"] = reports
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path, data in sorted(files.items()):
            zf.writestr(zipfile.ZipInfo(path, _ZIP_TIME), data, compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr(zipfile.ZipInfo(MANIFEST, _ZIP_TIME), json.dumps(manifest, indent=2))
    log.info("wrote %s (%d files, folds %s)", out, len(files) + 1, folds)
    return manifest


def _onnx_files(run: RunFolder, folds: list[int], files: dict[str, bytes], *, int8: bool,
                calibration_cases: int) -> dict[str, Any]:
    import tempfile

    from medseg.deploy.export import export_run

    reports: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="medseg-export-") as tmp:
        rep = export_run(run.root, "onnx", Path(tmp), folds=folds, int8=int8, calibration_cases=calibration_cases)
        for f in folds:
            for prec in ("fp32", "int8") if int8 else ("fp32",):
                src = Path(tmp) / Path(run.onnx_file(f, prec)).name
                files[f"{ONNX_DIR}/{src.name}"] = src.read_bytes()
        reports = rep
    return reports


# ------------------------------------------------------------------------------------------------ reading
def _entry_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG) or name.endswith("/"):
        return "is not a regular file"
    if "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "has an absolute or Windows path"
    parts = PurePosixPath(name).parts
    if any(p in ("..", ".", "") for p in parts) or not parts:
        return "has a '..' or empty path component"
    if info.flag_bits & 0x1:
        return "is encrypted"
    return None


def verify_package(path: str | Path, *, size_limit: int = DEFAULT_SIZE_LIMIT) -> dict[str, Any]:
    """Check a package without writing anything: entry paths and types, sizes, and every SHA-256.

    Args:
        path: the ``.zip``.
        size_limit: the largest total unpacked size accepted, in bytes.

    Returns:
        The manifest.

    Raises:
        InputError: (one line) the first problem found.
    """
    path = Path(path)
    with _open_zip(path) as zf:
        manifest = _check_listing(path, zf, size_limit)
        for entry in manifest["files"]:
            for _chunk in _read_verified(path, zf, entry, manifest["files"][entry]):
                pass
    return manifest


@contextlib.contextmanager
def _open_zip(path: Path) -> Iterator[zipfile.ZipFile]:
    if not path.is_file():
        raise InputError(path, "does not exist", "a model package written by `medseg export-model`")
    try:
        with zipfile.ZipFile(path) as zf:
            yield zf
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise InputError(path, f"is not a readable zip file ({exc})", "a model package written by `medseg export-model`") from None


def _check_listing(path: Path, zf: zipfile.ZipFile, size_limit: int) -> dict[str, Any]:
    infos = zf.infolist()
    names = [i.filename for i in infos]
    for info in infos:
        problem = _entry_problem(info)
        if problem:
            raise InputError(path, f"entry {info.filename!r} {problem}; refused, nothing unpacked",
                             "a package written by `medseg export-model`")
    if len(set(names)) != len(names):
        raise InputError(path, "has duplicate entries; refused, nothing unpacked", "a package written by `medseg export-model`")
    total = sum(i.file_size for i in infos)
    if total > size_limit:
        raise InputError(path, f"unpacks to {total} bytes, over the limit of {size_limit}; refused, nothing unpacked",
                         "a package within the size limit (raise it with --size-limit-mb)")
    if MANIFEST not in names:
        raise InputError(path, f"has no {MANIFEST}; refused, nothing unpacked", "a package written by `medseg export-model`")
    try:
        manifest = json.loads(zf.read(MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError, zipfile.BadZipFile, OSError) as exc:
        raise InputError(path, f"{MANIFEST} is unreadable ({exc}); refused, nothing unpacked", "a valid manifest") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT or not isinstance(
            manifest.get("files"), dict):
        raise InputError(path, f"{MANIFEST} is not a {PACKAGE_FORMAT} manifest; refused, nothing unpacked",
                         "a package written by `medseg export-model`")
    if not _NAME.match(str(manifest.get("name", ""))):
        raise InputError(path, f"names itself {manifest.get('name')!r}; refused, nothing unpacked",
                         "a package name of letters, digits, '._-'")
    listed, present = set(manifest["files"]), set(names) - {MANIFEST}
    if listed != present:
        odd = sorted(listed ^ present)[0]
        where = "is not in the manifest" if odd in present else "is missing from the zip"
        raise InputError(path, f"entry {odd!r} {where}; refused, nothing unpacked", "a package written by `medseg export-model`")
    for info in infos:
        if info.filename != MANIFEST and info.file_size != int(manifest["files"][info.filename].get("size", -1)):
            raise InputError(path, f"entry {info.filename!r} has {info.file_size} bytes, the manifest says "
                             f"{manifest['files'][info.filename].get('size')}; refused, nothing unpacked",
                             "an unaltered package")
    for rec in ("model.json", "plan.json"):
        if rec not in listed:
            raise InputError(path, f"holds no {rec}; refused, nothing unpacked", "a package written by `medseg export-model`")
    return manifest


def _read_verified(path: Path, zf: zipfile.ZipFile, entry: str, meta: dict[str, Any]) -> Iterator[bytes]:
    """Yield the entry's bytes in chunks; raise at the end when its size or SHA-256 differs from the manifest."""
    digest, size, limit = hashlib.sha256(), 0, int(meta.get("size", -1))
    try:
        with zf.open(entry) as fh:
            while chunk := fh.read(1 << 20):
                size += len(chunk)
                if size > limit:
                    break
                digest.update(chunk)
                yield chunk
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:  # CRC error, truncated stream
        raise InputError(path, f"entry {entry!r} is damaged ({exc}); refused, nothing unpacked", "an unaltered package") from None
    if size != limit or digest.hexdigest() != meta.get("sha256"):
        raise InputError(path, f"entry {entry!r}: SHA-256 does not match the manifest (the package was altered or "
                         "damaged); refused, nothing unpacked", "an unaltered package")


def unpack_package(path: str | Path, target: str | Path, *, size_limit: int = DEFAULT_SIZE_LIMIT,
                   replace: bool = False) -> Path:
    """Verify a package and unpack it into the folder ``target`` (all or nothing).

    Args:
        path: the ``.zip``.
        target: the folder to create; it must not exist unless ``replace``.
        size_limit: largest total unpacked size, bytes.
        replace: replace an existing ``target``.

    Returns:
        ``target`` (a run folder for :meth:`Predictor.from_run`).

    Raises:
        InputError: a refused package (one line; nothing is written), or ``target`` exists.
    """
    path, target = Path(path), Path(target)
    if target.exists() and not replace:
        raise InputError(target, "already exists", "a new folder, or --force to replace it")
    manifest = verify_package(path, size_limit=size_limit)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{TMP_MARKER}{uuid.uuid4().hex[:8]}-{target.name}"
    try:
        tmp.mkdir()
        with _open_zip(path) as zf:
            for entry, meta in manifest["files"].items():
                dest = tmp.joinpath(*PurePosixPath(entry).parts)
                if tmp.resolve() not in dest.resolve().parents:  # belt and braces: checked in _check_listing
                    raise InputError(path, f"entry {entry!r} leaves the target folder; refused", "relative paths")
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(dest, "xb") as out:
                    for chunk in _read_verified(path, zf, entry, meta):
                        out.write(chunk)
            (tmp / MANIFEST).write_bytes(zf.read(MANIFEST))
        if target.exists():
            old = target.parent / f"{TMP_MARKER}{uuid.uuid4().hex[:8]}-old-{target.name}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("unpacked %s into %s", path.name, target)
    return target


def _verify_folder(folder: Path) -> bool:
    """True when an unpacked folder still matches its manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for entry, meta in manifest["files"].items():
            if _sha256(folder.joinpath(*PurePosixPath(entry).parts).read_bytes()) != meta["sha256"]:
                return False
    except (OSError, KeyError, ValueError, TypeError):
        return False
    return True


def install_package(path: str | Path, *, root: str | Path | None = None, force: bool = False,
                    size_limit: int = DEFAULT_SIZE_LIMIT) -> Path:
    """Unpack a package into the models folder as ``ROOT/NAME`` so that ``medseg predict -m NAME`` finds it.

    Args:
        path: the ``.zip``.
        root: the models folder (default :func:`models_dir`).
        force: replace an installed model of the same name.
        size_limit: largest total unpacked size, bytes.

    Returns:
        The installed folder.

    Raises:
        InputError: a refused package, or a model of that name already installed (without ``force``).
    """
    path = Path(path)
    with _open_zip(path) as zf:
        manifest = _check_listing(path, zf, size_limit)
    root = Path(root) if root is not None else models_dir()
    return unpack_package(path, root / manifest["name"], size_limit=size_limit, replace=force)


def _cached(path: Path, size_limit: int) -> Path:
    with _open_zip(path) as zf:
        manifest = _check_listing(path, zf, size_limit)
        key = _sha256(zf.read(MANIFEST))[:16]
    target = cache_dir() / f"{manifest['name']}-{key}"
    if target.is_dir() and _verify_folder(target):
        return target
    return unpack_package(path, target, size_limit=size_limit, replace=target.exists())


def resolve_model(model: str | Path, *, size_limit: int = DEFAULT_SIZE_LIMIT) -> Path:
    """What ``medseg predict -m MODEL`` names, as a run folder.

    Args:
        model: a run folder, a package ``.zip`` (verified and unpacked into :func:`cache_dir`), or the name of
            a model installed with ``medseg install-model`` (in :func:`models_dir`).
        size_limit: largest total unpacked size of a package, bytes.

    Returns:
        A folder with ``model.json``, ``plan.json`` and ``fold_K/``.

    Raises:
        InputError: none of these, or a refused package.
    """
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if p.suffix == ".zip":
        return _cached(p, size_limit)
    if _NAME.match(str(model)) and (models_dir() / str(model)).is_dir():
        return models_dir() / str(model)
    installed = sorted(d.name for d in models_dir().glob("*") if d.is_dir() and not d.name.startswith("."))
    raise InputError(model, "is not a run folder, a .zip model package or an installed model name",
                     f"one of the installed models {installed}" if installed else
                     f"a run folder or a package (none installed in {models_dir()})")
