"""Regions: overlapping label sets declared in dataset.json (nnU-Net v2's region-based training).

A region is a set of label values that together form one structure: BraTS scores the whole tumour (values 1, 2, 3),
the tumour core (1, 3) and the enhancing tumour (3), which nest. dataset.json declares them as labels whose value is
a list (a scalar ``v`` means ``[v]``), with ``regions_class_order``: the label value painted for each region when a
prediction is turned back into one label map::

    "labels": {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [1, 3], "enhancing": 3},
    "regions_class_order": [2, 1, 3]

The label files keep their integer values (the preprocessed cache too); a network trained on regions has one sigmoid
output per region (no background output) and its targets are the region masks, made on the fly
(:func:`medseg.transforms.regions.regions_onehot`). A prediction paints region ``i`` with ``regions_class_order[i]``
wherever its probability exceeds 0.5, in order, so later (inner) regions overwrite earlier ones.

This module parses the declaration (:func:`parse_regions`, :func:`read_regions`) and holds the typed
:class:`Region` the plan and the model record carry; it imports neither torch nor the rest of medseg.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError

__all__ = ["Region", "parse_regions", "read_regions", "region_masks", "region_label_names"]


@dataclass(frozen=True)
class Region:
    """One region: a name, the label values it unites and the value painted for it.

    Args:
        name: the region's name (dataset.json's label name), e.g. ``"whole_tumor"``.
        values: the label values (file values) whose union is the region, sorted.
        paint: the label value written where the region is predicted (its ``regions_class_order`` entry).
    """

    name: str
    values: tuple[int, ...]
    paint: int

    def to_dict(self) -> dict[str, Any]:
        """JSON form ``{"name", "values", "paint"}``."""
        return {"name": self.name, "values": [int(v) for v in self.values], "paint": int(self.paint)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Region:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: a missing key or a non-integer value.
        """
        try:
            values = tuple(sorted(int(v) for v in data["values"]))
            return cls(str(data["name"]), values, int(data["paint"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"region {data!r} is not {{'name': str, 'values': [int], 'paint': int}} ({exc})") from None


def _values(raw: Any) -> list[int] | None:
    """A label's value(s) as a flat list (a scalar ``v`` is ``[v]``; nested lists are flattened); None when not
    integers."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        return [int(raw)] if float(raw) == int(raw) else None
    if isinstance(raw, list) and raw:
        out: list[int] = []
        for item in raw:
            sub = _values(item)
            if sub is None:
                return None
            out.extend(sub)
        return out
    return None


def parse_regions(meta: Mapping[str, Any], where: str | Path | None) -> list[Region] | None:
    """The regions a dataset.json declares, or None when its labels are plain (no label is a list).

    Args:
        meta: the dataset.json content.
        where: the file, named in errors.

    Returns:
        The regions in declaration order (background and a label named ``ignore`` left out), or None.

    Raises:
        InputError: a label value that is not an integer (or list of integers), a negative value, a missing or
            malformed ``regions_class_order``, or a painted value outside its region.
    """
    labels = meta.get("labels")
    if not isinstance(labels, Mapping) or not any(isinstance(v, list) for v in labels.values()):
        return None
    names, sets = [], []
    for name, raw in labels.items():
        if str(name).strip().lower() == "ignore":  # the ignore label (unlabelled voxels) is no region
            continue
        values = _values(raw)
        if values is None:
            raise InputError(where, f"label {name!r} is {raw!r}", "an integer value or a list of integer values "
                                                                  "(a region)")
        if any(v < 0 for v in values):
            raise InputError(where, f"region {name!r} has a negative value {values}", "label values >= 0")
        if str(name).strip().lower() == "background" or values == [0]:
            if values != [0]:
                raise InputError(where, f"background is {raw!r}", "\"background\": 0")
            continue
        if 0 in values:
            raise InputError(where, f"region {name!r} holds the background value 0 ({values})",
                             "regions of foreground values only")
        names.append(str(name))
        sets.append(tuple(sorted(set(values))))
    order = meta.get("regions_class_order")
    paint = _values(order) if isinstance(order, list) else None
    if paint is None or len(paint) != len(names):
        raise InputError(where, f"declares {len(names)} regions ({', '.join(names)}) but regions_class_order is "
                                f"{order!r}", f"\"regions_class_order\": one label value per region, e.g. "
                                              f"{[s[0] for s in sets]}")
    for name, values, p in zip(names, sets, paint):
        if p not in values:
            raise InputError(where, f"regions_class_order paints region {name!r} with {p}, not one of its values "
                                    f"{list(values)}", "for each region a value of that region")
    return [Region(n, s, int(p)) for n, s, p in zip(names, sets, paint)]


def region_label_names(regions: Sequence[Region]) -> dict[int, str]:
    """``{label value: name}`` of the values the regions use (0 = background): a value that is a region on its
    own takes that region's name, the others ``label_V``."""
    single = {r.values[0]: r.name for r in regions if len(r.values) == 1}
    values = sorted({v for r in regions for v in r.values})
    return {0: "background", **{v: single.get(v, f"label_{v}") for v in values}}


def read_regions(path: str | Path) -> list[Region]:
    """The regions of a dataset.json file, for scoring label maps by region (``medseg evaluate --regions``).

    Region labels (:func:`parse_regions`) come first; else the ``labels_as_regions_for_evaluation`` object
    (``{"name": [values]}``, whose regions are painted with their largest value, unused when scoring).

    Args:
        path: the dataset.json (or the folder holding it).

    Returns:
        The regions, in declaration order.

    Raises:
        InputError: the file is missing, not JSON, or declares no regions.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "does not exist", "a dataset.json that declares regions") from None
    except (OSError, ValueError) as exc:
        raise InputError(path, f"is not readable JSON ({exc})", "a dataset.json") from None
    if not isinstance(meta, dict):
        raise InputError(path, "does not hold a JSON object", "a dataset.json object")
    regions = parse_regions(meta, path)
    if regions is not None:
        return regions
    extra = meta.get("labels_as_regions_for_evaluation")
    if isinstance(extra, Mapping) and extra:
        out = []
        for name, raw in extra.items():
            values = _values(raw)
            if not values or any(v <= 0 for v in values):
                raise InputError(path, f"labels_as_regions_for_evaluation[{name!r}] is {raw!r}",
                                 "a list of foreground label values")
            out.append(Region(str(name), tuple(sorted(set(values))), max(values)))
        return out
    raise InputError(path, "declares no regions (no label is a list of values, no labels_as_regions_for_evaluation)",
                     "labels such as \"whole_tumor\": [1, 2, 3] with regions_class_order")


def region_masks(label: np.ndarray, regions: Sequence[Region] | Sequence[Sequence[int]]) -> np.ndarray:
    """The boolean mask of each region in a label map of file values.

    Args:
        label: integer label map (any shape).
        regions: :class:`Region` objects, or the value lists themselves.

    Returns:
        bool array ``(R, *label.shape)``; ``[i]`` is ``label`` in region ``i``'s values.
    """
    sets = [r.values if isinstance(r, Region) else tuple(int(v) for v in r) for r in regions]
    label = np.asarray(label)
    return np.stack([np.isin(label, s) for s in sets]) if sets else np.zeros((0, *label.shape), bool)
