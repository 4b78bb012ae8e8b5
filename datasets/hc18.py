"""Convert the HC18 fetal head circumference training set into a medseg 2D data set.

HC18 (van den Heuvel et al. 2018, CC BY 4.0) ships ``NNN_HC.png`` ultrasound images with ``NNN_HC_Annotation.png``
annotations that are 1-pixel ELLIPSE OUTLINES, not masks. This script fills each outline (the hole inside the
closed outline; when an outline is open -- in the released data 186_HC and 346_HC are -- the convex hull of
the outline, which for an ellipse is the filled ellipse) and writes::

    OUT/images/NNN_HC.png     the image, copied byte for byte
    OUT/labels/NNN_HC.png     0 background, 1 head (uint8 PNG)
    OUT/manifest.csv          case_id, patient_id, image, label  (patient_id = the NNN prefix)
    OUT/dataset.json          labels and modality (MSD-style, 2D)

``NNN_HC``, ``NNN_2HC`` and ``NNN_3HC`` are scans of the same fetus, so ``patient_id`` is ``NNN`` and
``medseg split OUT`` keeps them in one fold. Pixel spacing is not applied (unit spacing).

Usage: ``python datasets/hc18.py ../shared/data/hc18/training_set OUT [--force]``
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import copy_file, prepare_output, write_layout, write_png_label  # noqa: E402

from medseg.data.manifest import Case, Manifest  # noqa: E402
from medseg.errors import InputError, MedsegError  # noqa: E402

log = logging.getLogger("medseg.datasets.hc18")

IMAGE_RE = re.compile(r"^(?P<subject>\d+)_(?P<scan>\d*)HC\.png$")
LABELS = {0: "background", 1: "head"}


def fill_outline(outline: np.ndarray) -> tuple[np.ndarray, str]:
    """Fill a 1-pixel closed outline into a mask.

    Args:
        outline: 2D array, non-zero on the outline.

    Returns:
        ``(mask uint8 0/1, method)`` where method is ``"filled"`` (hole filling of a closed outline) or ``"hull"``
        (convex hull, used when the outline is open so that hole filling leaves the inside empty).

    Raises:
        ValueError: the outline is empty.
    """
    from scipy import ndimage

    edge = np.asarray(outline) > 0
    if not edge.any():
        raise ValueError("empty annotation")
    filled = ndimage.binary_fill_holes(edge)
    if filled.sum() >= 1.5 * edge.sum():
        return filled.astype(np.uint8), "filled"
    from skimage.morphology import convex_hull_image

    return convex_hull_image(edge).astype(np.uint8), "hull"


def discover(src: str | Path) -> list[tuple[str, str, Path, Path]]:
    """The HC18 cases in ``src``.

    Args:
        src: the ``training_set`` folder.

    Returns:
        ``(case_id, subject, image, annotation)`` tuples sorted by case id.

    Raises:
        InputError: no ``NNN_HC.png`` images, or an image without its annotation.
    """
    src = Path(src)
    if not src.is_dir():
        raise InputError(src, "is not a folder", "HC18's training_set folder with NNN_HC.png images")
    out = []
    for img in sorted(src.glob("*HC.png")):
        m = IMAGE_RE.match(img.name)
        if not m:
            continue
        ann = img.with_name(img.stem + "_Annotation.png")
        if not ann.is_file():
            raise InputError(img, "has no annotation", f"{ann.name} beside it")
        out.append((img.stem, m["subject"], img, ann))
    if not out:
        raise InputError(src, "holds no NNN_HC.png images", "HC18's training_set folder")
    return out


def convert_hc18(src: str | Path, out: str | Path, *, force: bool = False) -> Manifest:
    """Convert HC18 to images/, labels/, manifest.csv and dataset.json under ``out``.

    Args:
        src: HC18 ``training_set`` folder (left unchanged).
        out: output folder, new or empty unless ``force``.
        force: write into a non-empty folder (overwriting the converter's own files only).

    Returns:
        The manifest of the converted data set (patients grouped by subject prefix).

    Raises:
        InputError: bad ``src``, unreadable annotation, or non-empty ``out``.
    """
    import imageio.v3 as iio

    out = Path(out)
    found = discover(src)
    prepare_output(out, force)
    cases, hull = [], []
    for case_id, subject, img, ann in found:
        try:
            outline = iio.imread(ann)
        except Exception as exc:  # imageio raises several types for corrupt files
            raise InputError(ann, f"cannot be read as PNG ({type(exc).__name__})", "a PNG annotation") from None
        if outline.ndim == 3:
            outline = outline[..., 0]
        try:
            mask, method = fill_outline(outline)
        except ValueError:
            raise InputError(ann, "annotation is empty", "a 1-pixel ellipse outline") from None
        if method == "hull":
            hull.append(case_id)
        copy_file(img, out / "images" / img.name)
        write_png_label(mask, out / "labels" / img.name)
        cases.append(Case(case_id, subject, [out / "images" / img.name], out / "labels" / img.name))
    if hull:
        log.info("%d open outline(s) filled by convex hull: %s", len(hull), ", ".join(hull))
    manifest = write_layout(out, "HC18", "HC18 fetal head ultrasound, ellipse outlines filled to masks "
                            "(van den Heuvel et al. 2018, CC BY 4.0)", cases, LABELS, "US")
    log.info("wrote %d cases of %d subjects to %s", len(cases), len(manifest.patients()), out)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="HC18 training_set folder")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        man = convert_hc18(args.src, args.out, force=args.force)
    except MedsegError as exc:
        print(f"hc18: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(man.cases)} cases of {len(man.patients())} subjects to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
