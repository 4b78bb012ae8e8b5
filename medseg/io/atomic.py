"""Atomic file writing: write to a temporary name in the target folder, then rename over the target."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "TMP_MARKER", "temporary_name", "target_of_temporary", "remove_stale_temporaries"]

log = logging.getLogger(__name__)

#: Temporary files carry this marker so that a crashed run's leftovers are recognisable (and ignored on reads).
TMP_MARKER = ".medseg-tmp-"
_TMP_NAME = re.compile(re.escape(TMP_MARKER) + r"[0-9a-f]{8}-(?P<target>.+)$")


def temporary_name(path: str | Path) -> Path:
    """A fresh temporary path next to ``path``: ``.medseg-tmp-XXXXXXXX-NAME`` (same suffixes as ``path``)."""
    path = Path(path)
    return path.with_name(f"{TMP_MARKER}{uuid.uuid4().hex[:8]}-{path.name}")


def target_of_temporary(name: str) -> str | None:
    """The file name a medseg temporary stands for (``.medseg-tmp-1a2b3c4d-x.nii.gz`` -> ``x.nii.gz``), else None."""
    m = _TMP_NAME.match(name)
    return m["target"] if m else None


def remove_stale_temporaries(folder: str | Path, targets: set[str] | None = None) -> list[Path]:
    """Remove the temporaries a killed medseg process left in ``folder`` (not recursive).

    Only names of medseg's own form (:func:`temporary_name`) are touched. Call this only where the caller owns the
    targets: a process that writes into a shared folder passes the names it writes, so that the live temporaries
    of other processes are never removed.

    Args:
        folder: the folder.
        targets: the final file names whose temporaries may go; None: every medseg temporary in the folder.

    Returns:
        The removed paths.
    """
    folder = Path(folder)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        target = target_of_temporary(name)
        if target is None or (targets is not None and target not in targets):
            continue
        p = folder / name
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            if p.is_symlink() or p.is_file():
                p.unlink()
                removed.append(p)
                log.info("removed %s, left by an interrupted run", p)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` with the same suffixes; rename it to ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left as it was, so a reader never sees a
    half-written file, and a kill -9 leaves at most a ``.medseg-tmp-`` file, never a partial ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
