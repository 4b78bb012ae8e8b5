"""dataset.json as MSD and nnU-Net v2 write it: read it, check the JSON type of each key medseg uses, and parse its
labels (``{"0": "background"}`` or ``{"background": 0}``, regions) and channel names, each problem a one-line
:class:`~medseg.errors.InputError` naming the file and the key. Split out of :mod:`medseg.data.manifest`.
"""

from __future__ import annotations

import json
from pathlib import Path

from medseg.data.regions import parse_regions, region_label_names
from medseg.errors import InputError

__all__ = ["read_dataset_json", "check_declared_types", "labels_and_channels"]


def read_dataset_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"is not valid JSON ({exc})", "a dataset.json file") from None
    if not isinstance(data, dict):
        raise InputError(path, "does not hold a JSON object", "a dataset.json object")
    return data


#: dataset.json keys medseg reads, with the JSON type each must have.
_DECLARED_TYPES = {"labels": (dict, "an object such as {\"0\": \"background\", \"1\": \"tumour\"}"),
                   "channel_names": (dict, "an object such as {\"0\": \"CT\"}"),
                   "modality": (dict, "an object such as {\"0\": \"CT\"}"),
                   "training": (list, "a list of {\"image\": ..., \"label\": ...} entries"),
                   "file_ending": (str, "a string such as \".nii.gz\""),
                   "numTraining": (int, "an integer number of training cases"),
                   "name": ((str, int), "a string"),
                   "ignore": (int, "an integer label value such as 3 (the highest label value)")}


def check_declared_types(meta: dict, where: Path) -> None:
    """Each key medseg reads from a dataset.json has its JSON type (one line naming key, value and type)."""
    for key, (types, expected) in _DECLARED_TYPES.items():
        value = meta.get(key)
        if value is None:
            continue
        if not isinstance(value, types) or (types is int and isinstance(value, bool)):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise InputError(where, f"'{key}' is {shown} ({_json_type(value)})", expected)


def _json_type(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)


def labels_and_channels(meta: dict, where: Path) -> tuple[dict[int, str], dict[int, str]]:
    """MSD labels are ``{"0": "background"}``; nnU-Net v2 labels are ``{"background": 0}``; nnU-Net v2 regions
    (a list of values per name) name the values they use (:func:`medseg.data.regions.region_label_names`)."""
    check_declared_types(meta, where)
    labels: dict[int, str] = {}
    regions = parse_regions(meta, where)
    entries = ({n: v for v, n in region_label_names(regions).items()} if regions is not None
               else meta.get("labels") or {})
    if regions is not None:  # a label named "ignore" next to the regions: the ignore label (_take_ignore_label)
        entries.update({k: v for k, v in meta["labels"].items() if str(k).strip().lower() == "ignore"})
    for k, v in entries.items():
        try:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if float(v) != int(v):
                    raise ValueError
                value, name = int(v), str(k)
            elif isinstance(v, (dict, bool)) or v is None:
                raise ValueError
            else:
                value, name = int(k), str(v)
        except (ValueError, OverflowError):
            raise InputError(where, f"label entry {k!r}: {v!r} has no integer value",
                             "labels as {\"0\": \"background\", ...} or {\"background\": 0, ...}") from None
        if value < 0:
            raise InputError(where, f"label {name!r} has the negative value {value}", "label values >= 0")
        if value in labels:
            raise InputError(where, f"labels {labels[value]!r} and {name!r} share the value {value}",
                             "one name per label value")
        labels[value] = name
    chans_src = meta.get("channel_names") or meta.get("modality") or {}
    try:
        channels = {int(k): str(v) for k, v in chans_src.items()}
        if any(k < 0 for k in channels):
            raise ValueError
    except (ValueError, AttributeError):
        raise InputError(where, f"channel names {chans_src!r} are not keyed by channel index",
                         "{\"0\": \"CT\", ...}") from None
    return dict(sorted(labels.items())), dict(sorted(channels.items()))
