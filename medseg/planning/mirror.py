"""The planner's mirror axes: flip only along axes where no label sits on a fixed side in the training set
(anterior/posterior hippocampus, left/right kidney), from the fingerprint's label statistics (docs/planning.md).
Split out of :mod:`medseg.planning.plan`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["choose_mirror_axes", "MIRROR_OFFSET", "MIRROR_CONSISTENCY", "MIRROR_MIN_CASES"]

#: A class sits on one side of an axis when its median centroid offset is at least this (in half-extents) ...
MIRROR_OFFSET = 0.3
#: ... and at least this share of the cases holding it put it on that side ...
MIRROR_CONSISTENCY = 0.8
#: ... counted only for classes present in at least this many cases.
MIRROR_MIN_CASES = 3


def choose_mirror_axes(fp: dict[str, Any], perms: list[list[int]], names: list[str], dims: int) -> tuple[list[int], str]:
    """Axes (of the plan frame) along which flipping keeps every label's meaning.

    The statistic: per case and foreground class, the class centroid's offset from the centre of the
    foreground's bounding box along each axis, in units of the box's half-extent (so in [-1, 1] whatever the case
    size). An axis is *not* mirrored when some class sits on one fixed side of it: the median offset is at least
    :data:`MIRROR_OFFSET` away from 0 and at least :data:`MIRROR_CONSISTENCY` of the cases holding the class put
    it on that side. Flipping such an axis would move the class to where the data never has it (anterior and
    posterior hippocampus, right and left kidney); a class centred on the axis, or on either side at random,
    leaves it mirrored. The offset threshold (0.3: the centroid at least 15% of the box's width off its centre)
    separates a side from the lean of an oblique structure: in MSD hippocampus the posterior part leans -0.24 of
    the half-extent along RAS x in every case (flipping x gives the mirror-image hippocampus, its
    anterior/posterior cue along y and z intact), while anterior sits at +0.55 along y and -0.45 along z. Robust
    by construction: medians and sign shares, in box units, so neither case size nor a few odd cases move it. With fewer than :data:`MIRROR_MIN_CASES` cases holding a class the statistic is not
    trusted for that class.
    """
    offsets = fp.get("class_offsets")
    if not offsets:
        return list(range(dims)), "no label statistics in the fingerprint: every axis mirrored"
    kept, reasons = [], []
    for a in range(dims):
        worst = None
        for k, name in enumerate(names):
            o = np.array([case[k][perm[a]] for case, perm in zip(offsets, perms)
                          if k < len(case) and case[k] is not None], dtype=float)
            if o.size < MIRROR_MIN_CASES:
                continue
            med = float(np.median(o))
            side = float(np.mean(np.sign(o) == np.sign(med)) * (abs(med) > 0))
            score = (abs(med) >= MIRROR_OFFSET and side >= MIRROR_CONSISTENCY, abs(med), name, med, side, o.size)
            if worst is None or score[:2] > worst[:2]:
                worst = score
        if worst is None:
            reasons.append(f"axis {a} mirrored (no class in {MIRROR_MIN_CASES}+ cases)")
            kept.append(a)
        elif worst[0]:
            _, _, name, med, side, n = worst
            reasons.append(f"axis {a} NOT mirrored: {name!r} lies on the {'+' if med > 0 else '-'} side in "
                           f"{100 * side:.0f}% of {n} cases (median offset {med:+.2f} of the foreground half-extent)")
        else:
            _, _, name, med, side, n = worst
            why = (f"under {MIRROR_OFFSET:g}" if abs(med) < MIRROR_OFFSET else
                   f"but on that side in only {100 * side:.0f}% of {n} cases")
            reasons.append(f"axis {a} mirrored: no class clearly on one side (largest lean: {name!r}, median offset "
                           f"{med:+.2f} {why})")
            kept.append(a)
    return kept, "; ".join(reasons)
