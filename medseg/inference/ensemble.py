"""Prediction with the configuration(s) a multi-configuration run chose (:mod:`medseg.planning.selection`).

One chosen configuration: its own :class:`~medseg.inference.Predictor` (its record, plan, preprocessing and
post-processing), exactly as ``Predictor.from_run(RUN/<configuration>)``. Two: an :class:`EnsemblePredictor`, which
runs each configuration's Predictor (each with its own plan and preprocessing), brings each one's class
probabilities back onto the input grid, averages them, takes the argmax there and applies the post-processing that
crossval chose on the ensemble's out-of-fold predictions (the selection record's).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.errors import InputError
from medseg.inference.postprocess import PostprocessSetting, postprocess
from medseg.inference.predictor import Prediction, Predictor, argmax_label, entropy
from medseg.io.volume import Volume
from medseg.planning.selection import Selection, candidate_name
from medseg.transforms.labels import decode_labels

__all__ = ["EnsemblePredictor", "predictor_for_selection"]

log = logging.getLogger(__name__)


def predictor_for_selection(root: str | Path, selection: Selection, *, folds: Sequence[int] | None = None,
                            device: Any = None, **options: Any) -> Predictor | EnsemblePredictor:
    """The predictor of a selection record's choice.

    Args:
        root: the multi-configuration run folder.
        selection: its selection record.
        folds, device, **options: as :meth:`Predictor.from_run` (passed to each configuration's Predictor).

    Returns:
        The chosen configuration's Predictor, or an :class:`EnsemblePredictor` of two.

    Raises:
        InputError: a chosen configuration's run folder is incomplete, or the two disagree on the labels.
    """
    root = Path(root)
    if len(selection.chosen) == 1:
        log.info("%s: configuration %s (%s)", root, selection.chosen[0], selection.rule or "chosen")
        return Predictor.from_run(root / selection.chosen[0], folds=folds, device=device, **options)
    post = bool(options.pop("postprocess", True))
    members = [Predictor.from_run(root / name, folds=folds, device=device, postprocess=False, **options)
               for name in selection.chosen]
    setting = PostprocessSetting.from_dict(selection.postprocessing) if post else PostprocessSetting()
    return EnsemblePredictor(members, setting, model_dir=root)


class EnsemblePredictor:
    """Average the input-grid probabilities of several configurations' Predictors.

    Args:
        members: one Predictor per configuration (built without post-processing), on the same labels.
        postprocessing: the setting applied to the ensemble's label map.
        model_dir: the run folder, or None.

    Attributes:
        record: the first member's record (channels, labels, label values: the same for every member);
        config_name: ``"3d_fullres+3d_lowres"``; device, labels, label_values, output_labels, num_classes, folds:
        as :class:`Predictor`.
    """

    def __init__(self, members: Sequence[Predictor], postprocessing: PostprocessSetting | None = None, *,
                 model_dir: str | Path | None = None):
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two predictors")
        first = members[0]
        for m in members[1:]:
            if m.label_values != first.label_values or m.record.in_channels != first.record.in_channels:
                raise InputError(model_dir or "ensemble", f"configurations {first.config_name} and "
                                 f"{m.config_name} disagree on labels or channels",
                                 "configurations trained on the same plan")
        self.members = list(members)
        self.postprocessing = postprocessing or PostprocessSetting()
        self.model_dir = None if model_dir is None else Path(model_dir)
        self.record = first.record
        self.config_name = candidate_name([m.config_name for m in members])
        self.device = first.device
        self.labels, self.label_values = dict(first.labels), list(first.label_values)
        self.output_labels, self.num_classes, self.folds = first.output_labels, first.num_classes, first.folds

    def predict(self, volume: Volume) -> Volume:
        """The ensemble's label map of ``volume`` on its grid (see :meth:`Predictor.predict`)."""
        return self.predict_full(volume).label

    def predict_full(self, volume: Volume, *, probabilities: bool = False, uncertainty: bool = False) -> Prediction:
        """Each configuration's probabilities on ``volume``'s grid, averaged; argmax; post-processing.

        Args:
            volume: the input image.
            probabilities: also return the averaged probabilities.
            uncertainty: also return the predictive entropy of the averaged probabilities.

        Returns:
            A :class:`~medseg.inference.Prediction` on ``volume``'s grid.
        """
        total = None
        for m in self.members:
            p = m.predict_full(volume, probabilities=True).probabilities
            assert p is not None
            total = p.array.astype(np.float32) if total is None else total + p.array
        assert total is not None
        prob = torch.from_numpy(total / len(self.members))
        label = decode_labels(argmax_label(prob).numpy(), self.label_values)
        if not self.postprocessing.is_identity:
            label = postprocess(label, self.postprocessing, volume.spacing)
        meta = {k: v for k, v in volume.meta.items() if k not in ("intent", "disk_dtype")}
        out = Prediction(Volume(label, volume.affine.copy(), volume.spatial_dims, {**meta, "kind": "label"}))
        if uncertainty:
            out.uncertainty = Volume(entropy(prob).numpy(), volume.affine.copy(), volume.spatial_dims,
                                     {**meta, "kind": "entropy"})
        if probabilities:
            out.probabilities = Volume(prob.numpy(), volume.affine.copy(), volume.spatial_dims,
                                       {**meta, "kind": "probabilities"})
        return out

    def __repr__(self) -> str:
        return f"EnsemblePredictor({', '.join(repr(m) for m in self.members)})"
