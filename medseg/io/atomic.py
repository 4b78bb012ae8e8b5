"""Atomic file writing: write to a temporary name in the target folder, then rename over the target."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "TMP_MARKER"]

#: Temporary files carry this marker so that a crashed run's leftovers are recognisable (and ignored on reads).
TMP_MARKER = ".medseg-tmp-"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` with the same suffixes; rename it to ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left as it was, so a reader never sees a
    half-written file, and a kill -9 leaves at most a ``.medseg-tmp-`` file, never a partial ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = path.with_name(f"{TMP_MARKER}{uuid.uuid4().hex[:8]}-{stem}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
