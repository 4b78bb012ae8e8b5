"""Label values as the data has them: file values <-> consecutive class indices.

A data set's label maps may use any integer values (e.g. 0/200/500/600). The plan's ``label_values`` lists the
file value of each class index (``label_values[k]`` is class ``k``), so the network has one output per label,
never one per integer. Preprocessing encodes file values into class indices (:func:`encode_labels`); every output
on the input's grid (predicted masks, out-of-fold predictions, DICOM-SEG segments) decodes class indices back into
file values (:func:`decode_labels`) in a dtype that holds the largest value (:func:`label_dtype`).

An ignore label (the plan's ``ignore_value``, unlabelled voxels) is not a class: it is encoded as the class index
``len(label_values)`` (one past the last class, nnU-Net v2's convention), which the losses, the patch sampler and
validation leave out, and which no prediction holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medseg.errors import InputError

__all__ = ["encode_labels", "decode_labels", "label_dtype", "value_names", "is_identity"]


def is_identity(label_values: Sequence[int]) -> bool:
    """True when class index ``k`` is the file value ``k`` for every class (no mapping needed)."""
    return all(int(v) == k for k, v in enumerate(label_values))


def label_dtype(label_values: Sequence[int]) -> np.dtype:
    """The smallest integer dtype holding every value: uint8 up to 255, uint16 up to 65535, else int16/int32.

    Args:
        label_values: the file value of each class index.

    Returns:
        ``np.dtype`` (uint8, uint16, int16 or int32).
    """
    lo, hi = min(int(v) for v in label_values), max(int(v) for v in label_values)
    if lo >= 0:
        return np.dtype(np.uint8 if hi <= 255 else np.uint16 if hi <= 65535 else np.int32)
    return np.dtype(np.int16 if lo >= -32768 and hi <= 32767 else np.int32)


def encode_labels(label: np.ndarray, label_values: Sequence[int], source: str | Path | None = None,
                  ignore_value: int | None = None) -> np.ndarray:
    """File values -> class indices (int16), through ``label_values``.

    Args:
        label: integer label map (any shape).
        label_values: the file value of each class index (the plan's ``label_values``).
        source: the label file, named in the error.
        ignore_value: the file value of unlabelled voxels (the plan's ``ignore_value``), encoded as the index
            ``len(label_values)``; None = none.

    Returns:
        int16 array of class indices, same shape.

    Raises:
        InputError: a value of the file is not in ``label_values`` (names the file, the values found, the allowed).
    """
    values = [int(v) for v in label_values] + ([] if ignore_value is None else [int(ignore_value)])
    found = np.unique(label)
    unknown = [int(v) for v in found if int(v) not in values]
    if unknown:
        raise InputError(source, f"holds label values {[int(v) for v in found]}, of which {unknown} are not in the "
                                 f"plan", f"only the plan's label values {values}")
    if is_identity(values):
        return label.astype(np.int16, copy=False)
    lut_lo = min(values)
    lut = np.zeros(max(values) - lut_lo + 1, dtype=np.int16)
    lut[np.asarray(values) - lut_lo] = np.arange(len(values), dtype=np.int16)
    return lut[np.asarray(label, dtype=np.int64) - lut_lo]


def decode_labels(classes: np.ndarray, label_values: Sequence[int]) -> np.ndarray:
    """Class indices -> file values, in :func:`label_dtype` of the values.

    Args:
        classes: integer class-index map (any shape), each in ``0 .. len(label_values) - 1``.
        label_values: the file value of each class index.

    Returns:
        Array of file values, same shape.

    Raises:
        ValueError: a class index outside ``label_values``.
    """
    lut = np.asarray([int(v) for v in label_values], dtype=label_dtype(label_values))
    idx = np.asarray(classes)
    if idx.size and (idx.min() < 0 or idx.max() >= len(lut)):
        raise ValueError(f"class indices {int(idx.min())}..{int(idx.max())} outside 0..{len(lut) - 1}")
    return lut[idx]


def value_names(labels: Mapping[int, str], label_values: Sequence[int]) -> dict[int, str]:
    """``{class index: name}`` -> ``{file value: name}`` (the names written next to the original values)."""
    return {int(label_values[k]): str(name) for k, name in labels.items() if 0 <= int(k) < len(label_values)}
