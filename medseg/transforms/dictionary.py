"""Loading and plan-space preprocessing as MONAI dictionary transforms, for a MONAI ``Compose``.

``LoadVolumed`` reads NIfTI, DICOM series folders, NRRD/MHA (anything :func:`medseg.io.read_volume` reads) into
channel-first ``MetaTensor``s carrying the 4x4 RAS affine, like MONAI's ``LoadImaged`` + ``EnsureChannelFirstd``
(a key may hold a list of channel files; label keys are checked to be integer maps on the image's grid).
``PreprocessFromPland`` runs :func:`~medseg.transforms.preprocess.preprocess_volume` (reorient, crop, resample,
normalise) and records what :func:`~medseg.transforms.preprocess.restore_original` needs in the MetaTensor's
``applied_operations``, so MONAI's ``Invertd`` maps a plan-space prediction back onto the input's grid exactly as
``restore_original`` does.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform

from medseg.errors import InputError
from medseg.io import Volume
from medseg.transforms.case import load_image, load_label
from medseg.transforms.preprocess import preprocess_volume, restore_original

__all__ = ["LoadVolumed", "PreprocessFromPland", "to_metatensor", "to_volume"]

#: Volume.meta entries copied into a MetaTensor's meta: format and header facts, never DICOM identifiers
#: (series/SOP instance UIDs, file lists, descriptions stay out).
KEPT_META = ("format", "modality", "qform_code", "sform_code", "disk_dtype")


def to_metatensor(volume: Volume, source: Any = None) -> MetaTensor:
    """A channel-first ``MetaTensor`` of ``volume``: its array, float64 RAS affine and the :data:`KEPT_META`."""
    meta = {k: volume.meta[k] for k in KEPT_META if k in volume.meta}
    meta.update({"filename_or_obj": str(source if source is not None else volume.meta.get("source", "")),
                 "spatial_shape": np.asarray(volume.shape), "original_channel_dim": 0, "space": "RAS",
                 "original_affine": torch.as_tensor(volume.affine, dtype=torch.float64)})
    x = MetaTensor(torch.from_numpy(np.ascontiguousarray(volume.array)), meta=meta)
    x.affine = torch.as_tensor(volume.affine, dtype=torch.float64)
    return x


def to_volume(x: Any, key: Hashable = "image") -> Volume:
    """The :class:`~medseg.io.Volume` of a channel-first MetaTensor (its array and affine).

    Raises:
        InputError: ``x`` is not a MetaTensor (no world geometry).
    """
    if not isinstance(x, MetaTensor):
        raise InputError(None, f"data[{key!r}] is a {type(x).__name__} without an affine",
                         "a MetaTensor, e.g. from LoadVolumed or MONAI's LoadImaged + EnsureChannelFirstd")
    arr = x.as_tensor().detach().cpu().numpy()
    affine = np.asarray(x.affine.detach().cpu().numpy(), dtype=np.float64)
    return Volume(arr, affine, arr.ndim - 1, {"source": x.meta.get("filename_or_obj")})


class LoadVolumed(MapTransform):
    """Read each key's file (or list of channel files) into a channel-first MetaTensor with its RAS affine.

    Args:
        keys: keys holding a path (NIfTI, DICOM series folder, NRRD, MHA, PNG, ...) or a list of channel paths.
        label_keys: keys read as label maps (int16, checked to be single-channel integers on the grid of the
            image read before them); the others become float32 images.
        allow_missing_keys: skip absent keys (e.g. a label at inference time).

    Raises:
        InputError: unreadable files, channels or label on different grids, non-integer labels.
    """

    def __init__(self, keys: KeysCollection, label_keys: Sequence[str] = ("label",),
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.label_keys = tuple(label_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image: Volume | None = None
        image_path = None
        for key in self.key_iterator(d):
            src = d[key]
            if key in self.label_keys:
                vol = load_label(src, image, image_path)
            else:
                paths = [src] if isinstance(src, (str, Path)) else list(src)
                vol = load_image(paths)
                if image is None:
                    image, image_path = vol, paths[0]
            d[key] = to_metatensor(vol, src if isinstance(src, (str, Path)) else src[0])
        return d


class PreprocessFromPland(MapTransform, InvertibleTransform):
    """Plan-space preprocessing of an image (and its label) as the plan says; invertible (MONAI's ``Invertd``).

    Args:
        plan: the plan, passed as given to :func:`~medseg.transforms.preprocess.preprocess_volume`.
        config_name: the configuration, e.g. ``"3d_fullres"``.
        image_key: key of the image MetaTensor (all channels).
        label_key: key of its label map (absent in the data: image only); None: never a label.

    Inverse: a key's plan-space array goes back to the input's original grid and affine through
    :func:`~medseg.transforms.preprocess.restore_original`: integer arrays, or one-channel arrays inverted with
    ``Invertd(nearest_interp=True)`` (MONAI's default), as label maps; other float arrays as per-class
    probabilities (linear, certain background outside the crop).

    Raises:
        InputError / ConfigError: as :func:`~medseg.transforms.preprocess.preprocess_volume`.
    """

    def __init__(self, plan: Any, config_name: str, image_key: str = "image", label_key: str | None = "label"):
        keys = [image_key] + ([label_key] if label_key else [])
        super().__init__(keys, allow_missing_keys=True)
        self.plan, self.config_name = plan, config_name
        self.image_key, self.label_key = image_key, label_key

    def _out(self, orig: Any, arr: np.ndarray, props: dict[str, Any], mode: str) -> MetaTensor:
        x = MetaTensor(torch.from_numpy(arr)).copy_meta_from(orig) if isinstance(orig, MetaTensor) \
            else MetaTensor(torch.from_numpy(arr))
        x.affine = torch.as_tensor(np.asarray(props["affine"]), dtype=torch.float64)
        return self.push_transform(x, orig_size=props["original_shape"], extra_info={"props": props, "mode": mode})

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.image_key not in d:
            raise InputError(None, f"no {self.image_key!r} in the data ({sorted(map(str, d))})",
                             f"an image under {self.image_key!r}")
        lab = d.get(self.label_key) if self.label_key else None
        image = to_volume(d[self.image_key], self.image_key)
        label = None if lab is None else to_volume(lab, self.label_key)
        arr, seg, props = preprocess_volume(image, self.plan, self.config_name, label)
        d[self.image_key] = self._out(d[self.image_key], arr, props, "bilinear")
        if seg is not None:
            d[self.label_key] = self._out(lab, seg, props, "nearest")
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            info = self.pop_transform(x)["extra_info"]
            props = info["props"]
            arr = x.as_tensor().detach().cpu().numpy() if isinstance(x, MetaTensor) else np.asarray(x)
            nearest_one_channel = info["mode"] == "nearest" and arr.shape[0] == 1
            is_label = not np.issubdtype(arr.dtype, np.floating) or nearest_one_channel
            out = MetaTensor(torch.from_numpy(restore_original(arr, props, is_label=is_label)))
            if isinstance(x, MetaTensor):
                out = out.copy_meta_from(x)
            out.affine = torch.as_tensor(np.asarray(props["original_affine"]), dtype=torch.float64)
            d[key] = out
        return d
