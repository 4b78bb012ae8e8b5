"""Preprocessing built from a plan (reorient, crop, resample, normalise), its exact inverse, and augmentation.

``preprocess_volume`` / ``restore_original`` map a :class:`~medseg.io.Volume` into plan space and back;
``augment_batch`` applies the spatial and intensity augmentation to whole batches (on the GPU when present).
The same steps as MONAI dictionary transforms, for a MONAI ``Compose``: ``LoadVolumed``, ``PreprocessFromPland``
(:mod:`medseg.transforms.dictionary`) and ``RandSpatiald``, ``RandMirrord``, ``RandNoised``, ... with
``augmentation_transforms`` (:mod:`medseg.transforms.random`). Those names import torch/MONAI on first use.
"""

from typing import Any

from medseg.transforms.preprocess import preprocess_volume, restore_label, restore_original

_LAZY = {
    "LoadVolumed": "dictionary", "PreprocessFromPland": "dictionary",
    "RandSpatiald": "random", "RandMirrord": "random", "RandNoised": "random", "RandBlurd": "random",
    "RandBrightnessd": "random", "RandContrastd": "random", "RandLowResd": "random", "RandGammad": "random",
    "augmentation_transforms": "random",
}

__all__ = ["preprocess_volume", "restore_original", "restore_label", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"medseg.transforms.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'medseg.transforms' has no attribute {name!r}")
