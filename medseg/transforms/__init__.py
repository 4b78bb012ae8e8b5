"""Preprocessing built from a plan (reorient, crop, resample, normalise), its exact inverse, and augmentation.

``preprocess_volume`` / ``restore_original`` map a :class:`~medseg.io.Volume` into plan space and back;
``augment_batch`` applies the spatial and intensity augmentation to whole batches (on the GPU when present).
Submodules import torch/MONAI only when used.
"""

from medseg.transforms.preprocess import preprocess_volume, restore_label, restore_original

__all__ = ["preprocess_volume", "restore_original", "restore_label"]
