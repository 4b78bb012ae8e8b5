"""The planner's choice of intensity normalisation per channel: CT from dataset.json's modality name, the DICOM
Modality tag or HU-like intensities; otherwise z-score per case, inside the nonzero mask where the data has a zero
background (docs/planning.md). Split out of :mod:`medseg.planning.plan`.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from medseg.planning.schema import Normalization

__all__ = ["choose_normalization", "hu_like", "CT_NAME", "NONZERO_CROP_FRACTION"]

#: A non-CT channel is z-scored inside its nonzero mask when its nonzero box keeps less than this share.
NONZERO_CROP_FRACTION = 0.75
#: dataset.json channel names that mean CT (``CT``, ``CT_arterial``, ``CECT``, ``NCCT``, ``CTA``).
CT_NAME = re.compile(r"(CE|NC)?CTA?([ _-].*)?")


def hu_like(ranges: list[list[float]]) -> tuple[bool, str]:
    """CT in Hounsfield units: air (about -1000, or -1024..-3024 padding) at the whole-image 0.5th percentile and
    no value beyond 4100 at the 99.5th, in at least 80% of cases."""
    ok = [-3100.0 <= lo <= -900.0 and hi <= 4100.0 for lo, hi in ranges]
    frac = sum(ok) / max(1, len(ok))
    lows = float(np.median([lo for lo, _ in ranges])) if ranges else float("nan")
    highs = float(np.median([hi for _, hi in ranges])) if ranges else float("nan")
    return frac >= 0.8, (f"whole-image 0.5/99.5 percentiles (median {lows:.0f} / {highs:.0f}) are HU-like "
                         f"(air at -900..-3100, top <= 4100) in {100 * frac:.0f}% of cases")


def choose_normalization(fp: dict[str, Any], c: int) -> tuple[Normalization, str]:
    """Normalisation of channel ``c`` and the fact that decided it (see docs/planning.md)."""
    st = fp["intensity"][c]
    name = str(fp["modalities"][c]) if c < len(fp["modalities"]) else "unknown"
    tags = [t for t in fp.get("dicom_modalities", []) if t] if c == 0 else []

    def ct(why: str) -> tuple[Normalization, str]:
        clip = [float(st["percentile_00_5"]), float(st["percentile_99_5"])]
        return (Normalization("ct", float(st["mean"]), float(st["std"]), clip),
                f"{why}: clip to the foreground 0.5-99.5 percentiles [{clip[0]:.4g}, {clip[1]:.4g}], then "
                f"foreground mean {st['mean']:.4g} / std {st['std']:.4g}")

    # "channel_0" is the manifest's placeholder for a channel that no dataset.json names
    named = name.strip().lower() not in ("", "unknown") and not re.fullmatch(r"channel_\d+", name.strip())
    if named and CT_NAME.fullmatch(name.strip().upper()):
        return ct(f"dataset.json names channel {c} {name!r}")
    if not named and tags:
        tag = max(set(tags), key=tags.count)
        if tag == "CT":
            return ct(f"DICOM Modality tag CT ({tags.count('CT')}/{len(tags)} cases)")
        source = f"DICOM Modality tag {tag}"
    elif named:
        source = f"dataset.json names channel {c} {name!r} (not CT)"
    else:
        hu, how = hu_like(fp["image_ranges"][c]) if fp.get("image_ranges") else (False, "no intensity ranges")
        if hu:
            return ct(f"no modality given; {how}")
        source = f"no modality given and the intensities are not HU-like ({how})"
    crop = fp.get("channel_crop_fraction", [fp.get("median_crop_fraction", 1.0)] * (c + 1))[c]
    if crop < NONZERO_CROP_FRACTION:
        return (Normalization("zscore_nonzero"),
                f"{source}; cropping to its nonzero region keeps {100 * crop:.0f}% of the image (< "
                f"{100 * NONZERO_CROP_FRACTION:.0f}%, a zero background such as skull-stripped brain MR): z-score "
                f"per case inside the nonzero mask")
    return (Normalization("zscore"), f"{source}; its nonzero region is {100 * crop:.0f}% of the image: z-score "
                                     f"per case")
