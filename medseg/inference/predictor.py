"""The Predictor: load a run folder once, then turn input Volumes into label Volumes on the input's exact grid.

``Predictor.from_run(RUN).predict(volume)`` runs: preprocessing into plan space (:mod:`medseg.transforms`),
sliding-window inference of every fold with test-time mirroring (probabilities averaged over mirrors and
folds), the exact inverse of preprocessing with the argmax taken on the input's grid (``restore_label``), the
class indices mapped back to the data's label values and the run's post-processing. The result carries the
input's affine, shape and voxel order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.errors import ConfigError, InputError
from medseg.inference.postprocess import PostprocessSetting, postprocess
from medseg.inference.sliding_window import SlidingWindowInferer
from medseg.io.volume import Volume
from medseg.planning.record import ModelRecord, fold_dirs, load_model_record, previous_stage_dir
from medseg.runtime import (
    build_network,
    load_checkpoint,
    normalize_precision,
    resolve_device,
    resolve_precision,
)
from medseg.transforms.labels import decode_labels, value_names

__all__ = ["Predictor", "Prediction", "PreparedCase", "InferenceOptions", "entropy", "argmax_label"]

log = logging.getLogger(__name__)


@dataclass
class InferenceOptions:
    """How to run inference.

    Args:
        tta: test-time mirroring over the configuration's ``mirror_axes``.
        overlap: sliding-window overlap in ``[0, 1)``.
        batch_size: windows per forward pass (default: the configuration's training batch size, at most 8).
        amp: mixed precision, ``auto | bf16 | fp16 | fp32`` (:func:`medseg.runtime.resolve_precision`: ``auto``
            is bf16 on CUDA devices that have it, else fp16; bf16 on CPUs with native bf16, else float32).
        postprocess: apply the run's ``postprocessing.json``.
        checkpoint: ``"best"`` (falls back to ``latest`` when absent) or ``"latest"``.
        compile: ``torch.compile`` each fold's network once for the window shape
            (:mod:`medseg.inference.compiled`; pays off over many cases in float32 or on CUDA).
        restore: how the label goes back onto the input's grid: ``"probabilities"`` (resample the class
            probabilities there and take the argmax, in bounded slabs: smooth edges where the input is finer than
            the plan) or ``"label"`` (argmax in plan space, then nearest: the first release's way). Default None:
            ``"probabilities"``, except for a first-release run folder, which predicts exactly as it did.
    """

    tta: bool = True
    overlap: float = 0.5
    batch_size: int | None = None
    amp: str = "auto"
    postprocess: bool = True
    checkpoint: str = "best"
    compile: bool = False
    restore: str | None = None


@dataclass
class Prediction:
    """A prediction on the input's grid.

    Args:
        label: ``(1, *spatial)`` integer label map with the input's geometry.
        probabilities: ``(K, *spatial)`` float32 class probabilities (averaged over mirrors and folds), if asked.
        uncertainty: ``(1, *spatial)`` float32 predictive entropy (nats) of the averaged probabilities, if asked.
    """

    label: Volume
    probabilities: Volume | None = None
    uncertainty: Volume | None = None


@dataclass
class PreparedCase:
    """A case preprocessed into plan space, waiting for the network (:meth:`Predictor.prepare`).

    Args:
        volume: the input image (its geometry and metadata are those of the output).
        image: ``(C, *plan_spatial)`` float32 in plan space.
        props: what :meth:`Predictor.finish` needs to restore the input's grid.
    """

    volume: Volume
    image: np.ndarray
    props: dict[str, Any]


def _chunks(n_first: int, per_slice: int, budget: int = 2**24) -> list[slice]:
    step = max(1, budget // max(1, per_slice))
    return [slice(i, i + step) for i in range(0, n_first, step)]


def entropy(prob: torch.Tensor) -> torch.Tensor:
    """Voxel-wise entropy (nats) of class probabilities ``(K, *s)`` -> ``(1, *s)`` float32, in bounded chunks."""
    out = torch.empty((1, *prob.shape[1:]), dtype=torch.float32, device=prob.device)
    for sl in _chunks(prob.shape[1], prob[:, :1].numel()):
        p = prob[:, sl]
        out[0, sl] = -(p * p.clamp_min(1e-12).log()).sum(0)
    return out


def argmax_label(prob: torch.Tensor) -> torch.Tensor:
    """``(K, *s)`` -> ``(1, *s)`` int16 argmax, in chunks (no full-size int64 index array)."""
    out = torch.empty((1, *prob.shape[1:]), dtype=torch.int16, device=prob.device)
    for sl in _chunks(prob.shape[1], prob[:, :1].numel()):
        out[0, sl] = prob[:, sl].argmax(0).to(torch.int16)
    return out


class Predictor:
    """Predict label maps with the folds of one trained model.

    Args:
        networks: one module per fold (any device; moved to ``device``).
        record: the trained model's :class:`~medseg.planning.ModelRecord` (the only source of its facts).
        device: where inference runs (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
        options: :class:`InferenceOptions`.
        model_dir: the run folder the networks came from (None when built in memory).
        previous: a cascade stage's previous stage (``3d_lowres``), built without post-processing: its prediction
            of each input, brought into this plan space, enters the networks as one-hot channels
            (:mod:`medseg.transforms.cascade`). Required exactly when the record's configuration has a
            ``previous_stage``.

    Attributes:
        folds: the record's folds; inferer: the :class:`SlidingWindowInferer` every case runs through.
        labels: ``{class index: name}``; label_values: the data's value of each class index; output_labels:
            ``{label value: name}`` of the masks it writes (what DICOM-SEG segments and reports name).
    """

    def __init__(self, networks: Sequence[nn.Module], record: ModelRecord, *,
                 device: str | torch.device | None = None, options: InferenceOptions | None = None,
                 model_dir: str | Path | None = None, previous: Predictor | None = None):
        if not networks:
            raise ConfigError("networks", [], "at least one trained network")
        if len(networks) != len(record.folds):
            raise ConfigError("networks", f"{len(networks)} networks", f"one per fold of the record {record.folds}")
        if bool(record.config.previous_stage) != (previous is not None):
            raise ConfigError("previous", previous, f"the {record.config.previous_stage} Predictor of this cascade stage"
                              if record.config.previous_stage else "None (not a cascade stage)")
        self.previous = previous
        self.record = record
        self.plan = record.plan()
        self.config_name = record.configuration
        self.config = record.config
        self.folds = list(record.folds)
        self.model_dir = None if model_dir is None else Path(model_dir)
        self.device = resolve_device(device)
        self.options = options or InferenceOptions()
        if not 0.0 <= self.options.overlap < 1.0:
            raise ConfigError("--overlap", self.options.overlap, "a fraction in [0, 1)")
        if self.options.batch_size is not None and self.options.batch_size < 1:
            raise ConfigError("--batch-size", self.options.batch_size, "a positive number of windows")
        self.amp_dtype = resolve_precision(normalize_precision(self.options.amp, "--amp"), self.device)
        self.postprocessing = (PostprocessSetting.from_dict(record.postprocessing) if self.options.postprocess
                               else PostprocessSetting())
        self.num_classes = record.num_classes
        self.labels = dict(record.labels)
        self.label_values = list(record.label_values)
        self.output_labels = value_names(self.labels, self.label_values)
        self.restore = self.options.restore or record.restore
        if self.restore not in ("probabilities", "label"):
            raise ConfigError("restore", self.restore, "'probabilities' or 'label'")
        self.networks = [n.to(self.device).eval() for n in networks]
        self.patch_size = tuple(self.config.patch_size)
        self.mirror_axes = tuple(self.config.mirror_axes) if self.options.tta else ()
        self.batch_size = int(self.options.batch_size or min(self.config.batch_size, 8))
        self.inferer = SlidingWindowInferer.for_network(
            self.networks[0], self.patch_size, slice_axis=self.config.slice_axis if self.config.slicewise else None,
            overlap=self.options.overlap, mirror_axes=self.mirror_axes, batch_size=self.batch_size,
            device=self.device, amp_dtype=self.amp_dtype, activation="sigmoid" if record.regions else "softmax")
        self.valid_crop = self.inferer.valid_crop
        self._needs_compile = bool(self.options.compile)  # compiled at the first prediction

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_run(cls, model_dir: str | Path, folds: Sequence[int] | None = None,
                 device: str | torch.device | None = None, **options: Any) -> Predictor:
        """Load a trained model from its run folder: ``model.json`` and ``fold_K/checkpoint_best.pt``.

        Args:
            model_dir: the run folder written by ``medseg crossval`` (or ``medseg train`` for one fold).
            folds: folds to ensemble; default: every fold the model record lists (each must be present).
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; default CUDA when available.
            **options: fields of :class:`InferenceOptions` (``tta``, ``overlap``, ``batch_size``, ``amp``,
                ``postprocess``, ``checkpoint``, ``compile``).

        Returns:
            A ready Predictor. For a run that trained several configurations (``model.json`` a selection record,
            :mod:`medseg.planning.selection`): the chosen configuration's Predictor, or for an ensemble of two an
            :class:`~medseg.inference.ensemble.EnsemblePredictor` (same ``predict`` / ``predict_full``).

        Raises:
            InputError: missing or unreadable files, a fold of the record (or a requested fold) that is absent.
            ConfigError: invalid options.
        """
        import dataclasses

        root = Path(model_dir)
        from medseg.planning.selection import load_selection

        selection = load_selection(root)
        if selection is not None:
            from medseg.inference.ensemble import predictor_for_selection

            return predictor_for_selection(root, selection, folds=folds, device=device, **options)
        record = load_model_record(root)
        try:
            opts = InferenceOptions(**options)
        except TypeError as exc:
            raise ConfigError("options", sorted(options), "fields of InferenceOptions") from exc
        if opts.checkpoint not in ("best", "latest"):
            raise ConfigError("checkpoint", opts.checkpoint, "'best' or 'latest'")
        chosen = [int(f) for f in (record.folds if folds is None else folds)]
        if not chosen:
            raise ConfigError("folds", list(chosen), f"folds among {record.folds}")
        present = fold_dirs(root)
        absent = [f for f in chosen if f not in present]
        usable = sorted(f for f in record.folds if f in present)
        if absent and folds is None:
            raise InputError(root, f"model.json lists fold(s) {absent} but their fold_K folders are missing",
                             "the complete run folder, or --folds " + (",".join(map(str, usable)) or "K")
                             + " to predict with fewer folds knowingly")
        if absent:
            raise InputError(root, f"has no trained fold(s) {absent}", f"folds among {usable}")
        not_recorded = [f for f in chosen if f not in record.folds]
        if not_recorded:
            raise InputError(root, f"fold(s) {not_recorded} are not part of the trained model",
                             f"folds among {record.folds}")
        dev = resolve_device(device)
        networks = []
        for f in chosen:
            path = _checkpoint_path(present[f], opts.checkpoint)
            ckpt = load_checkpoint(path)
            net = build_network(record.network.to_dict(), spatial_dims=record.config.network_dims,
                                in_channels=record.network_in_channels, out_channels=record.out_channels)
            try:
                net.load_state_dict(ckpt["state_dict"])
            except RuntimeError as exc:
                raise InputError(path, f"weights do not fit the network ({str(exc).splitlines()[0]})",
                                 "a checkpoint of this run's network") from None
            networks.append(net)
            log.info("loaded fold %d from %s", f, path.name)
        record = dataclasses.replace(record, folds=chosen)
        previous = None
        if record.config.previous_stage:  # a cascade stage: its previous stage's folds of the same numbers
            previous = cls.from_run(previous_stage_dir(root, record.config.previous_stage), folds=chosen, device=dev,
                                    **{**options, "postprocess": False})
            log.info("cascade: %s first, then %s", previous.config_name, record.configuration)
        return cls(networks, record, device=dev, options=opts, model_dir=root, previous=previous)

    # ------------------------------------------------------------------------------------------ predicting
    def predict(self, volume: Volume) -> Volume:
        """Predict the label map of ``volume``.

        Args:
            volume: the input image (all channels), in any orientation and spacing.

        Returns:
            ``(1, *spatial)`` Volume of the data's label values (the record's ``label_values``; uint8 when they
            fit, else uint16/int16) with ``volume``'s exact geometry.

        Raises:
            InputError: the image does not fit the plan (channels, dimensionality).
        """
        return self.predict_full(volume).label

    def predict_full(self, volume: Volume, *, probabilities: bool = False, uncertainty: bool = False) -> Prediction:
        """Predict with optional probabilities and predictive entropy, all on ``volume``'s grid.

        Args:
            volume: the input image.
            probabilities: also return the averaged class probabilities.
            uncertainty: also return the voxel-wise predictive entropy over mirrors and folds.

        Returns:
            A :class:`Prediction`.

        Raises:
            InputError: the image does not fit the plan.
        """
        prepared = self.prepare(volume)
        prob = self.predict_array(prepared.image)
        return self.finish(prepared, prob, probabilities=probabilities, uncertainty=uncertainty)

    def prepare(self, volume: Volume) -> PreparedCase:
        """The read side of :meth:`predict_full`: ``volume`` preprocessed into plan space (no network).

        Batch prediction (:mod:`medseg.inference.pipeline`) runs this in a reader thread while the network works
        on another case.

        Args:
            volume: the input image.

        Returns:
            A :class:`PreparedCase` for :meth:`predict_array` and :meth:`finish`.

        Raises:
            InputError: the image does not fit the plan.
        """
        from medseg.transforms.preprocess import preprocess_volume

        if self.previous is None:
            image, _, props = preprocess_volume(volume, self.plan, self.config_name)
            return PreparedCase(volume, image, props)
        from medseg.transforms.cascade import stack_previous

        first = self.previous.predict(volume)  # the previous stage's label map on the input grid
        image, prev, props = preprocess_volume(volume, self.plan, self.config_name, label=first)
        assert prev is not None
        return PreparedCase(volume, stack_previous(image, prev, self.num_classes), props)

    def finish(self, prepared: PreparedCase, prob: torch.Tensor, *, probabilities: bool = False,
               uncertainty: bool = False) -> Prediction:
        """The write side of :meth:`predict_full`: the network's probabilities back onto the input's grid.

        Restores the label onto the input grid, maps class indices to the data's label values, applies the
        run's post-processing and, if asked, restores the probabilities and the predictive entropy.

        Args:
            prepared: from :meth:`prepare`.
            prob: ``(K, *plan_spatial)`` from :meth:`predict_array` on ``prepared.image``.
            probabilities: also return the averaged class probabilities.
            uncertainty: also return the voxel-wise predictive entropy over mirrors and folds.

        Returns:
            A :class:`Prediction`.
        """
        from medseg.transforms.preprocess import restore_label, restore_original

        volume, props = prepared.volume, prepared.props
        if self.record.regions:  # one sigmoid probability per region, painted in regions_class_order
            from medseg.inference.regions import region_probabilities, restore_regions

            classes = restore_regions(prob, props, self.record.regions, self.label_values, restore=self.restore)
        elif self.restore == "probabilities":
            classes = restore_label(prob, props)
        else:
            classes = restore_original(argmax_label(prob).cpu().numpy(), props, is_label=True)
        label = decode_labels(classes, self.label_values)
        if self.options.postprocess and not self.postprocessing.is_identity:
            label = postprocess(label, self.postprocessing, volume.spacing, regions=self.record.regions)
        meta = {k: v for k, v in volume.meta.items() if k not in ("intent", "disk_dtype")}
        out = Prediction(Volume(label, volume.affine.copy(), volume.spatial_dims, {**meta, "kind": "label"}))
        if uncertainty:
            from medseg.inference.regions import region_entropy

            ent = (region_entropy(prob) if self.record.regions else entropy(prob)).cpu().numpy()
            ent = restore_original(ent, props, is_label=False).astype(np.float32)
            out.uncertainty = Volume(ent, volume.affine.copy(), volume.spatial_dims, {**meta, "kind": "entropy"})
        if probabilities:
            p = (region_probabilities(prob, props) if self.record.regions else
                 restore_original(prob.cpu().numpy(), props, is_label=False).astype(np.float32))
            out.probabilities = Volume(p, volume.affine.copy(), volume.spatial_dims, {**meta, "kind": "probabilities"})
        return out

    def predict_array(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Class probabilities of a preprocessed plan-space image, averaged over mirrors and folds.

        Args:
            image: ``(C, *spatial)`` float32 in plan space.

        Returns:
            ``(K, *spatial)`` float32 probabilities (on the accumulation device).
        """
        if self._needs_compile:
            from medseg.inference.compiled import compile_for_inference

            shape = (self.batch_size, self.record.network_in_channels, *self.patch_size)
            self.networks = [compile_for_inference(n, shape, self.device, self.amp_dtype) for n in self.networks]
            self._needs_compile = False
        image_t = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image)
        total = None
        for i, net in enumerate(self.networks):
            p = self.inferer(net, image_t)
            total = p if total is None else total.add_(p.to(total.device))
            log.debug("fold %d of %d done", i + 1, len(self.networks))
        return total.div_(len(self.networks))

    def __repr__(self) -> str:
        return (f"Predictor(config={self.config_name!r}, folds={self.folds}, "
                f"device={self.device}, tta={bool(self.mirror_axes)}, patch={self.patch_size}, "
                f"windows/batch={self.batch_size}, amp={self.amp_dtype})")


def _checkpoint_path(fold_dir: Path, which: str) -> Path:
    names = ["checkpoint_best.pt", "checkpoint_latest.pt"] if which == "best" else ["checkpoint_latest.pt"]
    for name in names:
        if (fold_dir / name).is_file():
            if name != names[0]:
                log.warning("%s has no %s; using %s", fold_dir.name, names[0], name)
            return fold_dir / name
    raise InputError(fold_dir, f"holds none of {names}", "a fold trained by `medseg train`")
