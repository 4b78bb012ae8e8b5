"""`medseg info FILE_OR_DICOM_DIR`: shape, spacing, orientation, origin, dtype and value range of an image; the
series in a DICOM folder."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    """Add the ``info`` subcommand."""
    p = subparsers.add_parser(
        "info", help="describe an image or a DICOM folder (geometry, dtype, values, series)",
        description="Print shape, channels, spacing, orientation code, origin, dtype and value range of an image "
                    "(NIfTI, NRRD, MHA, PNG, TIFF, DICOM-SEG, RTSTRUCT) or of a DICOM series, and list the series "
                    "of a DICOM folder and the stacks (echoes, time points) of an enhanced multi-frame file.")
    p.add_argument("path", help="image file or folder holding DICOM files")
    p.add_argument("--series", metavar="UID", help="SeriesInstanceUID to describe when a folder holds several")
    p.add_argument("--stack", metavar="ID", help="stack to describe when a multi-frame file holds several")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def describe(volume) -> dict:
    """A JSON-serialisable summary of a Volume (no patient identifiers).

    Args:
        volume: a :class:`medseg.io.Volume`.

    Returns:
        dict with shape, channels, spatial_dims, spacing, orientation, origin, direction, dtype, min, max, format.
    """
    import numpy as np

    arr = volume.array
    finite = arr[np.isfinite(arr)] if np.issubdtype(arr.dtype, np.floating) else arr
    return {
        "format": volume.meta.get("format"),
        "shape": list(volume.shape),
        "channels": volume.channels,
        "spatial_dims": volume.spatial_dims,
        "spacing": [round(s, 6) for s in volume.spacing],
        "orientation": volume.orientation(),
        "origin": [round(o, 4) for o in volume.origin],
        "direction": np.round(volume.direction, 6).tolist(),
        "dtype": str(arr.dtype),
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "non_finite": int(arr.size - finite.size),
    }


def run(args: argparse.Namespace) -> int:
    """Print the description; returns 0 (user errors raise InputError, printed by the CLI)."""
    from pathlib import Path

    from medseg.errors import InputError
    from medseg.io import read_volume

    path = Path(args.path)
    if not path.exists():
        if path.is_symlink():
            raise InputError(path, "is a dangling symbolic link (or a link loop)", "a link to an existing image")
        raise InputError(path, "does not exist")
    out: dict = {"path": str(path)}
    volume = None
    if path.is_dir():
        from medseg.io.dicom import list_dicom_series

        series = list_dicom_series(path)
        out["series"] = [{"uid": s.uid, "description": s.description, "modality": s.modality,
                          "slices": s.num_slices, "files": len(s.files), "image": s.is_image, "kind": s.kind}
                         for s in series]
        images = [s for s in series if s.is_image]
        chosen = [s for s in images if s.uid == args.series] if args.series else images
        if len(chosen) == 1 and _stacks_listed(out, chosen[0].files, args.stack):
            volume = read_volume(path, series_uid=args.series, **({"stack": args.stack} if args.stack else {}))
        elif len(images) > 1 and not args.series:
            out["note"] = f"{len(images)} image series: pass --series UID to describe one"
    elif _stacks_listed(out, (path,), args.stack):
        volume = read_volume(path, **({"stack": args.stack} if args.stack else {}))
    if volume is not None:
        out.update(describe(volume))
        for key in ("series_uid", "modality", "series_description", "qform_code", "sform_code"):
            if volume.meta.get(key) is not None:
                out[key] = volume.meta[key]
        for key in ("segments", "rois", "stack", "geometry_note"):
            if volume.meta.get(key):
                out[key] = volume.meta[key]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(_text(out))
    return 0


def _stacks_listed(out: dict, files, stack: str | None) -> bool:
    """List the stacks of a single multi-frame file in ``out``; False when several and none chosen."""
    from medseg.io.dicom import _read_header

    if len(files) != 1:
        return True
    ds = _read_header(files[0])  # None for a file that is not DICOM
    if ds is None or int(ds.get("NumberOfFrames", 1) or 1) < 2 or "PerFrameFunctionalGroupsSequence" not in ds:
        return True
    from medseg.io.dicom_multiframe import list_stacks

    stacks = list_stacks(files[0])
    out["stacks"] = [{"id": s.id, "description": s.description, "frames": len(s.frames)} for s in stacks]
    if len(stacks) > 1 and stack is None:
        out["note"] = f"{len(stacks)} stacks: pass --stack ID to describe one"
        return False
    return True


def _text(info: dict) -> str:
    lines = [info["path"]]
    for s in info.get("series", []):
        what = f"{s['slices']} slices" if s["image"] else f"{s['kind']} (not an image), {s['files']} files"
        lines.append(f"  series {s['uid']}  {s['modality']:<4} '{s['description']}'  {what}")
    for s in info.get("stacks", []):
        lines.append(f"  stack {s['id']}  {s['description'] or '(one stack)'}  {s['frames']} frames")
    if "note" in info:
        lines.append(f"  {info['note']}")
    if "shape" in info:
        def fmt(values):
            return " x ".join(f"{v:g}" for v in values)

        lines += [
            f"  format       {info['format']}" + (f" ({info['modality']})" if info.get("modality") else ""),
            f"  shape        {fmt(info['shape'])}  ({info['spatial_dims']}D, {info['channels']} channel"
            f"{'s' if info['channels'] != 1 else ''})",
            f"  spacing      {fmt(info['spacing'])} mm",
            f"  orientation  {info['orientation']}",
            f"  origin       ({', '.join(f'{v:.4g}' for v in info['origin'])}) mm (RAS)",
            f"  dtype        {info['dtype']}",
            f"  values       {info['min']:g} .. {info['max']:g}" if info["min"] is not None else "  values  (none finite)",
        ]
        if info.get("non_finite"):
            lines.append(f"  non-finite   {info['non_finite']} voxels (NaN/Inf)")
        if info.get("series_uid") and info.get("format") == "dicom":
            lines.append(f"  series       {info['series_uid']}")
        if info.get("segments"):
            lines.append("  segments     " + ", ".join(f"{k}={v}" for k, v in info["segments"].items()))
        if info.get("rois"):
            lines.append("  ROIs         " + ", ".join(f"{k}={v}" for k, v in info["rois"].items()))
        if info.get("geometry_note"):
            lines.append(f"  resampled    {info['geometry_note']}")
    return "\n".join(lines)
