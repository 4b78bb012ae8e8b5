"""Region predictions on the input's grid, and the multi-label (one channel per structure) output.

A region network (:mod:`medseg.data.regions`) predicts one sigmoid probability per region. On the input's grid
(:func:`restore_regions`) the probabilities are resampled as class probabilities are and painted in
``regions_class_order`` (:func:`medseg.transforms.regions.paint_regions`); outside the image's nonzero crop every
region probability is 0, so the label there is background 0. :func:`region_probabilities` restores the probabilities
themselves (``--save-probabilities``: one channel per region).

``--output-format nifti-multilabel`` writes :func:`multilabel_volume`: a 4D uint8 NIfTI with one channel per region
(the region masks of the final, post-processed label map), or per foreground class without regions, on exactly the
input's grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.data.regions import Region, region_masks
from medseg.io.volume import Volume

if TYPE_CHECKING:
    import torch

__all__ = ["restore_regions", "region_probabilities", "region_entropy", "multilabel_volume", "MULTILABEL_FORMAT"]

#: The ``--output-format`` of :func:`multilabel_volume`.
MULTILABEL_FORMAT = "nifti-multilabel"


def _paint_classes(regions: Sequence[Region], label_values: Sequence[int]) -> list[int]:
    index = {int(v): k for k, v in enumerate(label_values)}
    return [index[int(r.paint)] for r in regions]


def restore_regions(prob: torch.Tensor, props: dict[str, Any], regions: Sequence[Region],
                    label_values: Sequence[int], *, restore: str = "probabilities") -> np.ndarray:
    """The painted class-index label of region probabilities, on the input's original grid.

    Args:
        prob: ``(R, *plan-space shape)`` region probabilities (averaged over mirrors and folds).
        props: what :func:`medseg.transforms.preprocess.preprocess_volume` returned for this input.
        regions: the model's regions; label_values: its class index -> label value table.
        restore: ``"probabilities"`` (resample, then paint on the input's grid) or ``"label"`` (paint in plan
            space, then nearest).

    Returns:
        int16 ``(1, *original shape)`` class indices (decode with ``label_values``); 0 outside the crop.
    """
    from medseg.transforms.preprocess import restore_label, restore_original
    from medseg.transforms.regions import paint_regions

    paint = _paint_classes(regions, label_values)
    if restore == "probabilities":
        return restore_label(prob, props, decide=lambda p: paint_regions(p, paint))
    return restore_original(paint_regions(prob, paint)[None].cpu().numpy(), props, is_label=True)


def region_probabilities(prob: torch.Tensor, props: dict[str, Any]) -> np.ndarray:
    """Region probabilities ``(R, *plan space)`` on the input's grid, 0 outside the crop (float32)."""
    import torch

    from medseg.transforms.preprocess import restore_original

    return restore_original(torch.as_tensor(prob).cpu().numpy(), props, is_label=False,
                            background_channel=False).astype(np.float32)


def region_entropy(prob: torch.Tensor) -> torch.Tensor:
    """Voxel-wise uncertainty of region probabilities ``(R, *s)``: the sum of the regions' binary entropies (nats),
    ``(1, *s)`` float32."""
    p = prob.float().clamp(1e-12, 1 - 1e-12)
    return (-(p * p.log() + (1 - p) * (1 - p).log())).sum(0, keepdim=True)


def multilabel_volume(label: Volume, regions: Sequence[Region] = (), label_values: Sequence[int] = ()) -> Volume:
    """A label map as one binary channel per structure, on the label's exact grid.

    Args:
        label: ``(1, *spatial)`` predicted label map (label values).
        regions: the model's regions: channel ``i`` is region ``i`` (the label's values in its set); empty: one
            channel per foreground label value.
        label_values: the model's label values (class 0 first, the background); used without regions.

    Returns:
        uint8 Volume ``(C, *spatial)`` with ``label``'s affine, ``meta["channel_names"]`` naming each channel.
    """
    arr = np.asarray(label.array[0])
    if regions:
        masks, names = region_masks(arr, regions), [r.name for r in regions]
    else:
        fg = [int(v) for v in label_values[1:]]
        masks, names = region_masks(arr, [[v] for v in fg]), [str(v) for v in fg]
    meta = {k: v for k, v in label.meta.items() if k not in ("intent", "disk_dtype")}
    return Volume(masks.astype(np.uint8), label.affine.copy(), label.spatial_dims,
                  {**meta, "kind": "multilabel", "channel_names": names})
