"""Convert the ISBI 2012 EM segmentation challenge training slices into a medseg 2D data set.

The 30 labelled slices (``train/image/N.png``, ``train/label/N.png`` with 255 = cell interior, 0 = membrane) are
written as a 2D data set whose label 1 is MEMBRANE, the class the U-Net paper (Ronneberger et al. 2015)
segments::

    OUT/images/slice_NN.png    the image, copied byte for byte
    OUT/labels/slice_NN.png    0 cell interior, 1 membrane (uint8 PNG)
    OUT/imagesTs/slice_NN.png  the 30 unlabelled challenge test slices (when present), not in the manifest
    OUT/manifest.csv           case_id, patient_id, image, label
    OUT/dataset.json           labels and modality (MSD-style, 2D)

All 30 slices come from ONE 512x512x30 serial-section stack (one animal), so there is no patient to group by:
each slice is its own "patient". Neighbouring slices are strongly correlated, so cross-validation scores on
this set are optimistic compared with a new stack; say so when reporting them.

Usage: ``python datasets/isbi2012.py ../shared/data/isbi2012_em OUT [--force]``
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import copy_file, prepare_output, write_layout, write_png_label  # noqa: E402

from medseg.data.manifest import Case, Manifest  # noqa: E402
from medseg.errors import InputError, MedsegError  # noqa: E402

log = logging.getLogger("medseg.datasets.isbi2012")

LABELS = {0: "background", 1: "membrane"}


def membrane_mask(label: np.ndarray) -> np.ndarray:
    """ISBI label (255 interior, 0 membrane) -> 1 membrane, 0 interior (threshold at 128)."""
    arr = np.asarray(label)
    if arr.ndim == 3:
        arr = arr[..., 0]
    return (arr < 128).astype(np.uint8)


def _slices(folder: Path) -> list[Path]:
    return sorted((p for p in folder.glob("*.png") if p.stem.isdigit()), key=lambda p: int(p.stem))


def convert_isbi2012(src: str | Path, out: str | Path, *, force: bool = False) -> Manifest:
    """Convert ISBI 2012 to images/, labels/, imagesTs/, manifest.csv and dataset.json under ``out``.

    Args:
        src: folder with ``train/image``, ``train/label`` (and optionally ``test/image``); left unchanged.
        out: output folder, new or empty unless ``force``.
        force: write into a non-empty folder (overwriting the converter's own files only).

    Returns:
        The manifest (one patient per slice).

    Raises:
        InputError: missing folders, unpaired slices, unreadable labels, or a non-empty ``out``.
    """
    import imageio.v3 as iio

    src, out = Path(src), Path(out)
    img_dir, lab_dir = src / "train" / "image", src / "train" / "label"
    if not img_dir.is_dir() or not lab_dir.is_dir():
        raise InputError(src, "lacks train/image/ or train/label/", "the ISBI 2012 folder with train/image/N.png "
                         "and train/label/N.png")
    images = _slices(img_dir)
    if not images:
        raise InputError(img_dir, "holds no N.png slices", "PNG slices named 0.png, 1.png, ...")
    prepare_output(out, force)
    cases = []
    for img in images:
        lab = lab_dir / img.name
        if not lab.is_file():
            raise InputError(img, "has no label", f"{lab}")
        try:
            mask = membrane_mask(iio.imread(lab))
        except Exception as exc:  # imageio raises several types for corrupt files
            raise InputError(lab, f"cannot be read as PNG ({type(exc).__name__})", "a PNG label") from None
        cid = f"slice_{int(img.stem):02d}"
        copy_file(img, out / "images" / f"{cid}.png")
        write_png_label(mask, out / "labels" / f"{cid}.png")
        cases.append(Case(cid, cid, [out / "images" / f"{cid}.png"], out / "labels" / f"{cid}.png"))
    test_dir = src / "test" / "image"
    tests = _slices(test_dir) if test_dir.is_dir() else []
    for img in tests:
        copy_file(img, out / "imagesTs" / f"slice_{int(img.stem):02d}.png")
    manifest = write_layout(out, "ISBI2012_EM", "ISBI 2012 EM neuronal membranes: 30 labelled slices of one stack, "
                            "label 1 = membrane (Cardona et al. 2010; Arganda-Carreras et al. 2015)",
                            cases, LABELS, "EM")
    log.info("wrote %d labelled slices (+%d unlabelled test slices) to %s; each slice is its own patient",
             len(cases), len(tests), out)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="ISBI 2012 folder with train/ (and test/)")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        man = convert_isbi2012(args.src, args.out, force=args.force)
    except MedsegError as exc:
        print(f"isbi2012: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(man.cases)} slices to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
