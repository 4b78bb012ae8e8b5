"""`medseg convert IN OUT`: convert between image formats keeping the geometry (DICOM series -> NIfTI, NIfTI ->
NRRD/MHA, DICOM-SEG or RTSTRUCT -> NIfTI, label map -> DICOM-SEG or RTSTRUCT, ...)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the ``convert`` subcommand."""
    p = subparsers.add_parser(
        "convert", help="convert an image or DICOM series to NIfTI/NRRD/MHA/PNG/TIFF/DICOM-SEG/RTSTRUCT",
        description="Read IN (NIfTI, NRRD, MHA, PNG, TIFF, a DICOM series folder, a DICOM-SEG file, or an RTSTRUCT "
                    "file whose contours are rasterised onto the series in --source) and write OUT in the format "
                    "its suffix names (.nii.gz, .nii, .nrrd, .mha, .png, .tif), keeping the voxel-to-world geometry. "
                    "OUT ending in .dcm writes a DICOM-SEG (or with --dicom-type rtstruct an RTSTRUCT) of a label "
                    "map IN that references the DICOM series in --source. The output is written atomically.")
    p.add_argument("input", metavar="IN", help="input image file or DICOM folder")
    p.add_argument("output", metavar="OUT", help="output file; its suffix picks the format")
    p.add_argument("--series", metavar="UID", help="SeriesInstanceUID to read when IN holds several DICOM series")
    p.add_argument("--dtype", help="output data type, e.g. uint8, int16, float32 (default: keep)")
    p.add_argument("--spacing", type=float, nargs="+", metavar="MM", help="pixel spacing for PNG/TIFF input")
    p.add_argument("--source", metavar="DICOM_DIR",
                   help="the DICOM series folder a label lies on: for .dcm output, and for RTSTRUCT input (default "
                        "the RTSTRUCT's own folder)")
    p.add_argument("--labels", metavar="V=NAME,...",
                   help=".dcm output: segment/ROI names, e.g. '1=liver,2=tumour' (default: 'label V')")
    p.add_argument("--dicom-type", choices=("seg", "rtstruct"), default="seg",
                   help=".dcm output: a DICOM-SEG or an RTSTRUCT")
    p.add_argument("--stack", metavar="ID",
                   help="enhanced multi-frame input with several stacks/dimensions: the one to read (listed by "
                        "`medseg info`)")
    p.add_argument("--strict-geometry", action="store_true",
                   help="refuse gantry-tilted or unevenly spaced DICOM series (default: resample with a warning)")
    p.add_argument("--expect", choices=("2d", "3d"),
                   help="refuse IN unless it is a one-channel 2D or 3D image (e.g. a 4D NIfTI where 3D is expected)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def _parse_labels(text: str | None, values) -> dict[int, str]:
    from medseg.errors import ConfigError

    if not text:
        return {int(v): f"label {int(v)}" for v in values if int(v) != 0}
    out = {}
    for item in text.split(","):
        key, sep, name = item.partition("=")
        try:
            out[int(key)] = name.strip()
        except ValueError:
            raise ConfigError("--labels", text, "comma-separated VALUE=NAME pairs, e.g. '1=liver,2=tumour'") from None
        if not sep or not name.strip():
            raise ConfigError("--labels", text, "comma-separated VALUE=NAME pairs, e.g. '1=liver,2=tumour'")
    return out


def _is_seg(path) -> bool:
    from medseg.io.dicom_seg import is_dicom_seg

    return is_dicom_seg(path)


def run(args: argparse.Namespace) -> int:
    """Convert; returns 0 (user errors raise InputError/ConfigError, printed by the CLI)."""
    import logging
    from pathlib import Path

    import numpy as np

    from medseg.errors import ConfigError, InputError
    from medseg.io import read_volume, write_volume
    from medseg.io.registry import format_of

    src, dst = Path(args.input), Path(args.output)
    if not src.exists():
        raise InputError(src, "does not exist")
    if dst.exists() and dst.resolve() == src.resolve():
        raise InputError(dst, "is the input itself", "an output path different from the input (inputs are never "
                         "modified)")
    if dst.is_dir():
        raise InputError(dst, "is a folder", "an output file path such as out.nii.gz")
    if dst.exists() and not args.overwrite:
        raise InputError(dst, "already exists", "a new path, or --overwrite to replace it")
    is_seg_out = dst.suffix.lower() == ".dcm"
    if not is_seg_out:
        format_of(dst)  # unknown output suffix -> InputError before reading anything
    kwargs = {}
    in_format = format_of(src)
    if args.series and in_format == "dicom":
        kwargs["series_uid"] = args.series
    if args.spacing and in_format not in ("png", "tiff"):
        raise ConfigError("--spacing", args.spacing, "no value: only PNG/TIFF inputs take a spacing (others store one)")
    if args.spacing:
        kwargs["spacing"] = tuple(args.spacing) if len(args.spacing) > 1 else args.spacing[0]
    if args.expect:
        kwargs.update(spatial_dims=int(args.expect[0]), max_channels=1)
    from medseg.io.rtstruct import is_rtstruct

    if is_rtstruct(src):
        from medseg.io.rtstruct import read_rtstruct

        volume, names = read_rtstruct(src, args.source, strict_geometry=args.strict_geometry)
        print("ROIs: " + ", ".join(f"{v}={n}" for v, n in names.items()))
    else:
        if args.stack and in_format == "dicom" and not (src.is_file() and _is_seg(src)):
            kwargs["stack"] = args.stack
        volume = read_volume(src, strict_geometry=args.strict_geometry, **kwargs)
    if args.dtype:
        try:
            dtype = np.dtype(args.dtype)
        except TypeError:
            raise ConfigError("--dtype", args.dtype, "a NumPy dtype name such as uint8, int16, float32") from None
        volume = volume.with_array(volume.array.astype(dtype))
    if is_seg_out:
        from medseg.io.dicom_seg import write_dicom_seg
        from medseg.io.rtstruct import write_rtstruct

        if not args.source:
            raise ConfigError("--source", None, "the DICOM series folder the label map lies on (for .dcm output)")
        labels = _parse_labels(args.labels, np.unique(volume.array))
        writer = write_rtstruct if args.dicom_type == "rtstruct" else write_dicom_seg
        writer(volume, args.source, dst, labels, series_uid=args.series)
    else:
        write_volume(volume, dst)
    logging.getLogger(__name__).debug("converted %s -> %s", src, dst)
    print(f"wrote {dst}  ({' x '.join(map(str, volume.shape))}, {volume.array.dtype}, {volume.orientation()})")
    return 0
