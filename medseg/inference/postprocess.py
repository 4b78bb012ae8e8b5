"""Connected-component post-processing of label maps with cc3d, and the cross-validation choice of its setting.

Steps, applied in this order when enabled by a :class:`PostprocessSetting`:

1. remove components smaller than ``min_size_voxels`` voxels or ``min_size_mm3`` mm^3 (per class);
2. keep only the largest component of all foreground together (``largest_foreground``);
3. keep only the largest component of each class in ``largest_per_class``;
4. fill holes of the classes in ``fill_holes``: background regions enclosed by that class alone (not touching the
   image border) take the class;
5. with regions (:mod:`medseg.data.regions`), keep only the largest component of each region in
   ``largest_per_region`` (numbered from 1 in the model's order): the region's voxels (its label values together)
   outside that component become background. Cross-validation then chooses per region, judged by the region's Dice.

Foreground components use full connectivity (26 in 3D, 8 in 2D); background regions (holes) the dual face
connectivity (6 / 4), so that a hole never leaks through a diagonal gap.

The setting of a run lives in ``RUN/postprocessing.json`` (written by crossval with
:func:`save_postprocessing`, chosen by :func:`choose_postprocessing`); the Predictor applies it automatically.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import ConfigError, InputError

__all__ = [
    "PostprocessSetting",
    "postprocess",
    "remove_small_components",
    "keep_largest_component",
    "fill_holes",
    "choose_postprocessing",
    "load_postprocessing",
    "save_postprocessing",
]

log = logging.getLogger(__name__)

POSTPROCESSING_FILE = "postprocessing.json"


@dataclass(frozen=True)
class PostprocessSetting:
    """What post-processing to apply (all off by default: the identity).

    Args:
        largest_foreground: keep only the largest connected component of all foreground classes together.
        largest_per_class: classes reduced to their largest connected component.
        min_size_voxels: remove components (of any class) with fewer voxels.
        min_size_mm3: remove components with a smaller volume in mm^3 (needs the voxel spacing).
        fill_holes: classes whose enclosed background holes are filled.
        largest_per_region: regions (1 = the first region) reduced to their largest connected component.
    """

    largest_foreground: bool = False
    largest_per_class: tuple[int, ...] = field(default=())
    min_size_voxels: int = 0
    min_size_mm3: float = 0.0
    fill_holes: tuple[int, ...] = field(default=())
    largest_per_region: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("largest_per_class", "fill_holes", "largest_per_region"):
            object.__setattr__(self, name, tuple(sorted(int(c) for c in getattr(self, name))))
        if self.min_size_voxels < 0 or self.min_size_mm3 < 0:
            raise ConfigError("postprocessing.min_size", (self.min_size_voxels, self.min_size_mm3),
                              "non-negative sizes")
        if any(c <= 0 for c in (*self.largest_per_class, *self.fill_holes, *self.largest_per_region)):
            raise ConfigError("postprocessing classes", (self.largest_per_class, self.fill_holes,
                                                         self.largest_per_region), "foreground classes or regions (>= 1)")

    @property
    def is_identity(self) -> bool:
        """True when the setting changes nothing."""
        return self == PostprocessSetting()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (lists instead of tuples)."""
        d = asdict(self)
        d["largest_per_class"] = list(self.largest_per_class)
        d["fill_holes"] = list(self.fill_holes)
        d["largest_per_region"] = list(self.largest_per_region)
        if not self.largest_per_region:  # the form of settings without regions is unchanged
            del d["largest_per_region"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PostprocessSetting:
        """Build from :meth:`to_dict`'s form.

        Raises:
            ConfigError: unknown keys or invalid values.
        """
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError("postprocessing", sorted(unknown), f"keys among {sorted(cls.__dataclass_fields__)}")
        return cls(**data)


# --------------------------------------------------------------------------------------------- the steps
# Each step labels the components once with cc3d and then works on the foreground voxels only (their flat
# indices and component ids), so that after labelling no step makes a whole-volume fancy-indexing pass, a
# whole-volume bincount (an int64 copy of the labels) or a masked write over the background: on a CT-sized map
# the foreground is a few percent of the voxels. benchmarks/bench_postprocess.py measures it.
def _conn(ndim: int, faces: bool = False) -> int:
    if ndim == 2:
        return 4 if faces else 8
    return 6 if faces else 26


def _spatial(label: np.ndarray) -> np.ndarray:
    """A ``(1, *s)`` label map as its spatial array (a view)."""
    if label.ndim in (3, 4) and label.shape[0] == 1:
        return label[0]
    if label.ndim in (2, 3):
        return label
    raise ValueError(f"label must be (1, *spatial) or spatial with 2 or 3 axes, got shape {label.shape}")


@dataclass(frozen=True)
class _Components:
    """The connected components of a map's foreground, as flat indices (C order) and component ids."""

    index: np.ndarray   # flat indices of the foreground voxels, ascending
    ids: np.ndarray     # their component ids (1..n)
    n: int

    @classmethod
    def of(cls, image: np.ndarray, connectivity: int, *, binary: bool = False) -> _Components:
        """Label ``image`` (multi-label, or nonzero as one class when ``binary``) in one cc3d pass."""
        import cc3d

        cc, n = cc3d.connected_components(image, connectivity=connectivity, return_N=True, binary_image=binary)
        index = np.flatnonzero(image)
        return cls(index, cc.reshape(-1)[index], int(n))

    def sizes(self) -> np.ndarray:
        """Voxel count per component id (index 0, the background, counts nothing)."""
        return np.bincount(self.ids, minlength=self.n + 1)

    def erase(self, label: np.ndarray, drop: np.ndarray) -> np.ndarray:
        """A copy of ``label`` with the components where ``drop[id]`` is True set to 0."""
        out = np.array(label, order="C", copy=True)
        out.reshape(-1)[self.index[drop[self.ids]]] = 0
        return out


def remove_small_components(label: np.ndarray, min_voxels: int) -> np.ndarray:
    """Set components (per class) with fewer than ``min_voxels`` voxels to background.

    Components are those of ``cc3d.dust`` (multi-label, full connectivity), with the same result.

    Args:
        label: integer label map, spatial ``(*s)`` (2D or 3D).
        min_voxels: size threshold.

    Returns:
        A new label map.
    """
    label = np.ascontiguousarray(label)
    if min_voxels <= 1:
        return label.copy()
    comps = _Components.of(label, _conn(label.ndim))
    return comps.erase(label, comps.sizes() < int(min_voxels))


def keep_largest_component(label: np.ndarray, classes: Iterable[int] | None = None, *,
                           per_class: bool = False) -> np.ndarray:
    """Keep only the largest connected component of ``classes`` (all foreground when None).

    Ties go to the component met first in C order (cc3d's numbering), as ``cc3d.largest_k`` does.

    Args:
        label: integer label map, spatial.
        classes: the classes to reduce; voxels of other classes are untouched.
        per_class: each class of ``classes`` keeps its own largest component (one multi-label cc3d pass);
            otherwise the union of ``classes`` is one mask that keeps its largest component.

    Returns:
        A new label map.
    """
    label = np.ascontiguousarray(label)
    conn = _conn(label.ndim)
    if not per_class:
        mask = label > 0 if classes is None else np.isin(label, list(classes))
        comps = _Components.of(mask, conn, binary=True)
        if comps.n <= 1:
            return label.copy()
        drop = np.ones(comps.n + 1, dtype=bool)
        drop[int(np.argmax(comps.sizes()[1:])) + 1] = False
        return comps.erase(label, drop)
    comps = _Components.of(label, conn)
    if comps.n == 0:
        return label.copy()
    sizes = comps.sizes()
    comp_class = np.zeros(comps.n + 1, dtype=label.dtype)
    comp_class[comps.ids] = label.reshape(-1)[comps.index]   # every voxel of a component has its class
    present = comp_class[1:]
    wanted = set(int(c) for c in (classes if classes is not None else np.unique(present[present > 0])))
    drop = np.zeros(comps.n + 1, dtype=bool)
    for c in wanted:
        ids = np.flatnonzero(comp_class == c)
        ids = ids[ids > 0]
        if ids.size > 1:
            drop[ids] = True
            drop[ids[np.argmax(sizes[ids])]] = False
    return comps.erase(label, drop)


def fill_holes(label: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """Fill background regions enclosed by exactly one of ``classes`` (and not touching the border).

    The background is labelled once (face connectivity); the classes around each enclosed region are read
    from the face neighbours of its voxels alone (an enclosed region never lies on the border, so every
    neighbour is inside the image).

    Args:
        label: integer label map, spatial.
        classes: classes whose holes are filled.

    Returns:
        A new label map.
    """
    import cc3d

    label = np.ascontiguousarray(label)
    classes = set(int(c) for c in classes)
    out = label.copy()
    if not classes:
        return out
    holes, n = cc3d.connected_components(label == 0, connectivity=_conn(label.ndim, faces=True), return_N=True,
                                         binary_image=True)
    if n == 0:
        return out
    enclosed = np.ones(n + 1, dtype=bool)
    enclosed[0] = False
    for ax in range(label.ndim):
        for idx in (0, -1):
            enclosed[np.take(holes, idx, axis=ax)] = False
    if not enclosed.any():
        return out
    index = np.flatnonzero(enclosed[holes])
    hole_of = holes.reshape(-1)[index]
    flat = label.reshape(-1)
    strides = [int(np.prod(label.shape[ax + 1:])) for ax in range(label.ndim)]
    hole_ids, around = [], []
    for step in (s * sign for s in strides for sign in (1, -1)):
        nb = flat[index + step]
        touching = nb != 0      # a background neighbour belongs to the same hole
        hole_ids.append(hole_of[touching])
        around.append(nb[touching])
    pairs = np.unique(np.stack([np.concatenate(hole_ids), np.concatenate(around).astype(np.int64)]), axis=1)
    ids, first, count = np.unique(pairs[0], return_index=True, return_counts=True)
    single = count == 1
    ids, cls = ids[single], pairs[1, first[single]]
    chosen = np.isin(cls, sorted(classes))
    fill = np.zeros(n + 1, dtype=label.dtype)
    fill[ids[chosen]] = cls[chosen]
    out.reshape(-1)[index] = fill[hole_of]
    return out


def postprocess(label: np.ndarray, setting: PostprocessSetting | dict | None,
                spacing: Sequence[float] | None = None, regions: Sequence[Any] = ()) -> np.ndarray:
    """Apply a post-processing setting to a label map.

    Args:
        label: integer label map, ``(1, *spatial)`` or ``(*spatial)``; not modified.
        setting: a :class:`PostprocessSetting`, its dict form, or None (identity).
        spacing: voxel size in mm per spatial axis; required when ``min_size_mm3`` is set.
        regions: the model's regions (:class:`~medseg.data.regions.Region`), required by ``largest_per_region``.

    Returns:
        A new label map of the same shape and dtype.

    Raises:
        ConfigError: an invalid setting, ``min_size_mm3`` without ``spacing``, or a region the model lacks.
    """
    if setting is None:
        return label.copy()
    if isinstance(setting, dict):
        setting = PostprocessSetting.from_dict(setting)
    arr = _spatial(label)
    threshold = setting.min_size_voxels
    if setting.min_size_mm3 > 0:
        if spacing is None:
            raise ConfigError("postprocessing.min_size_mm3", setting.min_size_mm3, "a voxel spacing to convert mm3")
        threshold = max(threshold, math.ceil(setting.min_size_mm3 / float(np.prod(spacing)) - 1e-9))
    out = remove_small_components(arr, threshold) if threshold > 1 else arr.copy()
    if setting.largest_foreground:
        out = keep_largest_component(out)
    if setting.largest_per_class:
        out = keep_largest_component(out, setting.largest_per_class, per_class=True)
    if setting.fill_holes:
        out = fill_holes(out, setting.fill_holes)
    for r in setting.largest_per_region:
        if r > len(regions):
            raise ConfigError("postprocessing.largest_per_region", r, f"regions 1..{len(regions)} of the model")
        out = keep_largest_component(out, regions[r - 1].values)
    return out.reshape(label.shape).astype(label.dtype, copy=False)


# --------------------------------------------------------------------------------------------- choosing it
def _dice_per_class(pred: np.ndarray, ref: np.ndarray, classes: Sequence[int],
                    ignore: int | None = None, regions: Sequence[Any] = ()) -> dict[int, float]:
    """Dice per class value, or with ``regions`` per region number ``c`` (1-based) of the regions' masks."""
    out = {}
    labelled = True if ignore is None else ref != ignore
    for c in classes:
        if regions:
            p, r = np.isin(pred, regions[c - 1].values) & labelled, np.isin(ref, regions[c - 1].values)
        else:
            p, r = (pred == c) & labelled, ref == c
        denom = int(p.sum()) + int(r.sum())
        out[c] = 1.0 if denom == 0 else 2.0 * int(np.logical_and(p, r).sum()) / denom
    return out


def _mean_dice(cases, setting: PostprocessSetting, classes, ignore: int | None = None,
               regions: Sequence[Any] = ()) -> dict[int, float]:
    totals = dict.fromkeys(classes, 0.0)
    for pred, ref, spacing in cases:
        d = _dice_per_class(postprocess(pred, setting, spacing, regions), ref, classes, ignore, regions)
        for c in classes:
            totals[c] += d[c]
    return {c: totals[c] / len(cases) for c in classes}


def choose_postprocessing(cases: Sequence[tuple[np.ndarray, np.ndarray, Sequence[float] | None]],
                          classes: Sequence[int], *, try_fill_holes: bool = True,
                          min_gain: float = 1e-4, ignore: int | None = None, regions: Sequence[Any] = (),
                          ) -> tuple[PostprocessSetting, dict[str, Any]]:
    """Choose a setting on cross-validation predictions, greedily as nnU-Net does.

    A step is adopted only when it raises the mean Dice (over cases) by more than ``min_gain``: first
    "largest foreground component" judged by the mean over all foreground classes, then per class "largest
    component" and "fill holes" judged by that class's Dice.

    Args:
        cases: ``(prediction, reference, spacing)`` per validation case (label maps of one shape each).
        classes: foreground class indices.
        try_fill_holes: also consider hole filling.
        min_gain: smallest improvement that counts.
        ignore: the reference value of unlabelled voxels, left out of every Dice (the post-processing itself
            still sees the whole prediction), or None.
        regions: the model's regions: ``classes`` are then region numbers (1-based), each judged by its region's
            Dice, and the per-class steps are "largest component" per region (no hole filling).

    Returns:
        The chosen setting and a report ``{"dice_before": {...}, "dice_after": {...}, "steps": [...]}`` for
        ``postprocessing.json``.

    Raises:
        InputError: no cases, or a prediction and reference of different shapes.
    """
    if not cases:
        raise InputError(None, "no validation cases to choose post-processing from", "at least one case")
    for i, (p, r, _) in enumerate(cases):
        if p.shape != r.shape:
            raise InputError(f"case {i}", f"prediction shape {p.shape} differs from reference {r.shape}")
    classes = [int(c) for c in classes]
    setting = PostprocessSetting()
    base = _mean_dice(cases, setting, classes, ignore, regions)
    current = dict(base)
    steps: list[dict[str, Any]] = []

    def mean(d):
        return float(np.mean([d[c] for c in classes])) if classes else 0.0

    trial = PostprocessSetting(largest_foreground=True)
    scores = _mean_dice(cases, trial, classes, ignore, regions)
    adopted = mean(scores) > mean(current) + min_gain
    steps.append({"step": "largest_foreground", "before": mean(current), "after": mean(scores), "adopted": adopted})
    if adopted:
        setting, current = trial, scores
    for c in classes:
        kinds = ([("largest_per_region", "largest_per_region")] if regions else
                 [("largest_per_class", "largest_per_class")] + ([("fill_holes", "fill_holes")] if try_fill_holes else []))
        for name, attr in kinds:
            d = setting.to_dict()
            d[attr] = sorted(set(d.get(attr, [])) | {c})
            trial = PostprocessSetting.from_dict(d)
            scores = _mean_dice(cases, trial, classes, ignore, regions)
            adopted = scores[c] > current[c] + min_gain
            steps.append({"step": f"{name}:{c}", "before": current[c], "after": scores[c], "adopted": adopted})
            if adopted:
                setting, current = trial, scores
    report = {"dice_before": {str(c): v for c, v in base.items()},
              "dice_after": {str(c): v for c, v in current.items()}, "steps": steps}
    log.info("post-processing chosen: %s (mean Dice %.4f -> %.4f)", setting.to_dict(), mean(base), mean(current))
    return setting, report


def save_postprocessing(path: str | Path, setting: PostprocessSetting, report: dict[str, Any] | None = None) -> None:
    """Write ``postprocessing.json`` (``{"version": 1, "setting": {...}, "report": {...}}``) atomically.

    Args:
        path: the file, or a run folder (the file is then ``postprocessing.json`` inside it).
        setting: the chosen setting.
        report: optional evidence (what :func:`choose_postprocessing` returns).
    """
    from medseg.io.atomic import atomic_path

    path = Path(path)
    if path.is_dir():
        path = path / POSTPROCESSING_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"version": 1, "setting": setting.to_dict(), "report": report or {}}, indent=2))


def load_postprocessing(path: str | Path) -> PostprocessSetting:
    """Read the setting from ``postprocessing.json`` (a file or a run folder); absent file -> identity.

    Args:
        path: the file or the run folder.

    Returns:
        The setting (the identity when the run has none, which is logged).

    Raises:
        InputError: the file exists but is not valid JSON.
        ConfigError: the setting has unknown keys or invalid values.
    """
    path = Path(path)
    if path.is_dir():
        path = path / POSTPROCESSING_FILE
    if not path.exists():
        log.info("no %s: predictions are not post-processed", path)
        return PostprocessSetting()
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot be read as JSON ({exc})", "a postprocessing.json written by crossval") from None
    if not isinstance(data, dict):
        raise InputError(path, "does not hold a JSON object", '{"version": 1, "setting": {...}}')
    return PostprocessSetting.from_dict(data.get("setting", data))
