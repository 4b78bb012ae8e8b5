"""Write a sparsely annotated copy of a data set: only some slices per case keep their labels, the rest are
marked with the ignore label (voxels that take no part in training, planning statistics or metrics).

For each labelled case, ``round(fraction * n)`` slices (at least one) of the ``n`` along ``--axis`` (a voxel axis
of the label file; default the last) keep their labels: evenly spaced and centred, slice ``floor((i + 0.5) * n /
k)`` for ``i < k`` -- deterministic, no randomness. Every other voxel gets the ignore value::

    OUT/<the source's relative image paths>   symbolic links to the source images (never copied)
    OUT/<the source's relative label paths>   the labels rewritten, same geometry and dtype
    OUT/dataset.json                          the source's, with the ignore label added to ``labels`` (its name
                                              ``ignore``, the highest value) and a top-level ``"ignore": N``
    OUT/manifest.csv                          when the source is a CSV manifest (same patients)
    OUT/sparsify.json                         fraction, axis, ignore value and the kept slices of every case

The ignore value is the source's ignore label if it has one, else one above its highest label value. The source
folder is never written to (an output inside it is refused).

Usage: ``python datasets/sparsify.py ../shared/data/hippocampus OUT --fraction 0.3 [--axis 2] [--force]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import prepare_output  # noqa: E402

from medseg.data.manifest import Case, Manifest, load_manifest, write_manifest_csv  # noqa: E402
from medseg.errors import InputError, MedsegError  # noqa: E402
from medseg.io import atomic_path, read_volume, write_volume  # noqa: E402

log = logging.getLogger("medseg.datasets.sparsify")


def kept_slices(n: int, fraction: float) -> list[int]:
    """The slices of ``n`` that keep their labels: ``round(fraction * n)`` (at least 1), evenly spaced, centred.

    Args:
        n: slices along the axis.
        fraction: share of slices to keep, in ``(0, 1]``.

    Returns:
        Sorted distinct slice indices.
    """
    k = min(n, max(1, int(round(fraction * n))))
    return sorted({int((i + 0.5) * n / k) for i in range(k)})


def _relative(path: Path, root: Path) -> Path:
    try:
        return Path(os.path.abspath(path)).relative_to(Path(os.path.abspath(root)))
    except ValueError:
        raise InputError(path, f"lies outside the data set folder {root}",
                         "cases inside the data set folder (their relative paths are mirrored)") from None


def sparsify_dataset(src: str | Path, out: str | Path, fraction: float, *, axis: int = -1,
                     force: bool = False) -> Manifest:
    """Write the sparsely annotated copy of ``src`` to ``out`` (see the module docstring).

    Args:
        src: a data set folder or CSV manifest that :func:`medseg.data.manifest.load_manifest` reads; unchanged.
        out: output folder, new or empty unless ``force``; not inside ``src``.
        fraction: share of slices per case that keep their labels, in ``(0, 1]``.
        axis: voxel axis of the label files along which slices are kept (negative counts from the end).
        force: write into a non-empty folder.

    Returns:
        The manifest of the copy (its ``ignore_label`` set).

    Raises:
        InputError: a bad fraction or axis, an output inside the source, case files outside the source folder,
            or unreadable labels.
    """
    src_path, out = Path(src), Path(out)
    if not 0.0 < float(fraction) <= 1.0:
        raise InputError(None, f"--fraction {fraction} is outside (0, 1]", "a share of slices such as 0.3")
    manifest = load_manifest(src_path)
    root = Path(manifest.root)
    if Path(os.path.abspath(out)).is_relative_to(Path(os.path.abspath(root))):
        raise InputError(out, f"lies inside the source data set {root}", "an output folder outside the source")
    ignore = manifest.ignore_label
    if ignore is None:
        ignore = max([0, *manifest.labels]) + 1
    prepare_output(out, force)
    record: dict[str, list[int]] = {}
    cases = []
    for case in manifest.cases:
        images = []
        for img in case.images:
            dst = out / _relative(img, root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            dst.symlink_to(Path(img).resolve())
            images.append(dst)
        label = None
        if case.label is not None:
            vol = read_volume(case.label)
            arr = np.asarray(vol.array)
            spatial = arr.ndim - 1
            ax = axis if axis >= 0 else spatial + axis
            if not 0 <= ax < spatial:
                raise InputError(case.label, f"has {spatial} spatial axes, so --axis {axis} does not exist",
                                 f"an axis between 0 and {spatial - 1}")
            keep = kept_slices(arr.shape[1 + ax], fraction)
            mask = np.zeros(arr.shape[1 + ax], dtype=bool)
            mask[keep] = True
            shape = [1] * arr.ndim
            shape[1 + ax] = -1
            dtype = np.promote_types(arr.dtype, np.min_scalar_type(ignore))  # a dtype that holds the ignore value
            sparse = np.where(mask.reshape(shape), arr, np.asarray(ignore, dtype=dtype)).astype(dtype)
            label = out / _relative(case.label, root)
            label.parent.mkdir(parents=True, exist_ok=True)
            write_volume(vol.with_array(sparse), label)
            record[case.case_id] = keep
        cases.append(Case(case.case_id, case.patient_id, images, label, getattr(case, "label_names", None)))
    meta = dict(manifest.declared)
    labels = dict(meta.get("labels") or {str(k): v for k, v in manifest.labels.items()})
    nnunet = any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in labels.values())
    labels = {k: v for k, v in labels.items() if str(v if nnunet else k) != str(ignore)
              and str(k if nnunet else v).lower() != "ignore"}
    labels.update({"ignore": ignore} if nnunet else {str(ignore): "ignore"})
    meta["labels"] = labels
    meta["ignore"] = int(ignore)
    meta.setdefault("name", manifest.name)
    if "training" not in meta and manifest.layout == "MSD":
        meta["training"] = []
    with atomic_path(out / "dataset.json") as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=2) + "\n")
    copy = Manifest(out, manifest.name, cases, dict(manifest.labels), dict(manifest.channel_names),
                    manifest.spatial_dims, [], manifest.layout, out / "dataset.json", meta, int(ignore))
    if manifest.layout == "CSV":
        write_manifest_csv(copy, out / "manifest.csv")
    info = {"source": str(Path(os.path.abspath(root))), "fraction": float(fraction), "axis": int(axis),
            "ignore": int(ignore), "kept_slices": record}
    with atomic_path(out / "sparsify.json") as tmp:
        Path(tmp).write_text(json.dumps(info, indent=1) + "\n")
    n_kept = sum(len(v) for v in record.values())
    log.info("%s: %d labelled cases, %d slices keep their labels, the rest are ignore (%d)", out, len(record),
             n_kept, ignore)
    return copy


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="data set folder (or CSV manifest), left unchanged")
    parser.add_argument("out", help="output folder (not inside the source)")
    parser.add_argument("--fraction", type=float, required=True, help="share of slices per case that keep labels")
    parser.add_argument("--axis", type=int, default=-1, help="voxel axis of the slices (default: the last)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        man = sparsify_dataset(args.src, args.out, args.fraction, axis=args.axis, force=args.force)
    except MedsegError as exc:
        print(f"sparsify: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(man.cases)} cases to {args.out} (ignore label {man.ignore_label})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
