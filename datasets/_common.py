"""Helpers shared by the dataset converters (not part of the medseg package: converters are scripts)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from medseg.data.manifest import Case, Manifest, write_manifest_csv
from medseg.errors import InputError
from medseg.io import atomic_path


def prepare_output(out: Path, force: bool) -> None:
    """Refuse to write into a non-empty folder unless ``force``; never delete anything the user had there."""
    if out.exists() and not out.is_dir():
        raise InputError(out, "is a file", "a new or empty output folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(out, "is not empty", "a new or empty output folder (or --force to overwrite)")
    out.mkdir(parents=True, exist_ok=True)


def copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` byte for byte, atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def write_png_label(mask: np.ndarray, dst: Path) -> None:
    """Write a 2D label map (values 0..255) as an 8-bit PNG, atomically."""
    import imageio.v3 as iio

    with atomic_path(dst) as tmp:
        iio.imwrite(tmp, np.ascontiguousarray(mask.astype(np.uint8)), extension=".png")


def write_layout(out: Path, name: str, description: str, cases: list[Case], labels: dict[int, str],
                 channel: str) -> Manifest:
    """Write ``dataset.json`` (MSD-style, 2D) and ``manifest.csv`` for converted cases; return the manifest."""
    meta = {
        "name": name,
        "description": description,
        "tensorImageSize": "2D",
        "modality": {"0": channel},
        "labels": {str(k): v for k, v in labels.items()},
        "numTraining": len(cases),
        "numTest": 0,
        "training": [{"image": "./" + c.images[0].relative_to(out).as_posix(),
                      "label": "./" + c.label.relative_to(out).as_posix()} for c in cases if c.label],
    }
    with atomic_path(out / "dataset.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    manifest = Manifest(out, name, cases, labels, {0: channel}, 2, [])
    write_manifest_csv(manifest, out / "manifest.csv")
    return manifest
