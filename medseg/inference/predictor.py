"""The Predictor: load a run folder once, then turn input Volumes into label Volumes on the input's exact grid.

``Predictor.from_run(RUN).predict(volume)`` runs: preprocessing into plan space (:mod:`medseg.transforms`),
sliding-window inference of every fold with test-time mirroring (probabilities averaged over mirrors and
folds), argmax, the exact inverse of preprocessing (``restore_original``) and the run's post-processing
(``postprocessing.json``). The result carries the input's affine, shape and voxel order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.errors import ConfigError, InputError
from medseg.inference.postprocess import PostprocessSetting, load_postprocessing, postprocess
from medseg.inference.sliding_window import sliding_window_predict, sliding_window_predict_slices
from medseg.io.volume import Volume

__all__ = ["Predictor", "Prediction", "InferenceOptions", "build_network", "resolve_device", "entropy",
           "argmax_label"]

log = logging.getLogger(__name__)


@dataclass
class InferenceOptions:
    """How to run inference.

    Args:
        tta: test-time mirroring over the configuration's ``mirror_axes``.
        overlap: sliding-window overlap in ``[0, 1)``.
        batch_size: windows per forward pass (default: the configuration's training batch size, at most 8).
        amp: ``"auto"`` (fp16 autocast on CUDA; bf16 on CPUs with native bf16, else float32), ``"bf16"``,
            ``"fp16"`` or ``"fp32"``.
        postprocess: apply the run's ``postprocessing.json``.
        checkpoint: ``"best"`` (falls back to ``latest`` when absent) or ``"latest"``.
        compile: ``torch.compile`` each fold's network once for the window shape
            (:mod:`medseg.inference.compiled`; pays off over many cases in float32 or on CUDA).
    """

    tta: bool = True
    overlap: float = 0.5
    batch_size: int | None = None
    amp: str = "auto"
    postprocess: bool = True
    checkpoint: str = "best"
    compile: bool = False


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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available else CPU; otherwise the named device.

    Raises:
        ConfigError: an unknown device name, or CUDA asked for where there is none.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError("--device", device, "'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", device, "'cpu' on a machine without CUDA")
    return dev


def build_network(spec: dict[str, Any], *, spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """Rebuild a network from its ``{"name", "kwargs"}`` record with :func:`medseg.networks.create_model`.

    Args:
        spec: ``{"name": ..., "kwargs": {...}}`` from the checkpoint or ``model.json``.
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: classes.

    Returns:
        The (randomly initialised) module.
    """
    from medseg.networks import create_model

    kwargs = dict(spec.get("kwargs", {}))
    for key in ("spatial_dims", "in_channels", "out_channels"):
        kwargs.pop(key, None)
    return create_model(spec["name"], spatial_dims=spatial_dims, in_channels=in_channels,
                        out_channels=out_channels, **kwargs)


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


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if amp == "auto":  # fp16 on CUDA; bf16 on CPUs with native bf16 (masks within 0.002 Dice of fp32, tested)
        from medseg.device import cpu_has_bf16

        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_bf16() else None
    if amp not in table:
        raise ConfigError("amp", amp, "'auto', 'fp32', 'bf16' or 'fp16'")
    if amp == "fp16" and device.type == "cpu":
        raise ConfigError("amp", amp, "'bf16' or 'fp32' on the CPU")
    return table[amp]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "does not exist", f"{what} in a run folder written by `medseg train`/`crossval`") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"is not valid JSON ({exc})", what) from None
    if not isinstance(data, dict):
        raise InputError(path, "does not hold a JSON object", what)
    return data


def _valid_crop(network: nn.Module, patch: Sequence[int], in_channels: int, device: torch.device) -> tuple[int, ...]:
    """Voxels lost per side by a valid-convolution network (0 for same-padded ones)."""
    if hasattr(network, "output_shape"):
        out = tuple(network.output_shape(list(patch)))
    else:
        with torch.no_grad():
            y = network(torch.zeros((1, in_channels, *patch), device=device))
        out = tuple((y[0] if isinstance(y, (list, tuple)) else y).shape[2:])
    crop = []
    for p, o in zip(patch, out):
        if (p - o) % 2:
            raise ConfigError("patch_size", list(patch), "a patch whose network output is centred (even loss)")
        crop.append((p - o) // 2)
    return tuple(crop)


class Predictor:
    """Predict label maps with the folds of one trained configuration.

    Args:
        networks: one module per fold (any device; moved to ``device``).
        plan: the run's plan.
        config_name: the configuration the networks were trained on.
        device: where inference runs.
        options: :class:`InferenceOptions`.
        postprocessing: the setting applied to each label map.
        labels: ``{index: name}`` of the classes.
    """

    def __init__(self, networks: Sequence[nn.Module], plan: dict[str, Any], config_name: str, *,
                 device: str | torch.device | None = None, options: InferenceOptions | None = None,
                 postprocessing: PostprocessSetting | None = None, labels: dict[int, str] | None = None):
        if not networks:
            raise ConfigError("networks", [], "at least one trained network")
        if config_name not in plan.get("configurations", {}):
            raise ConfigError("configuration", config_name, f"one of {sorted(plan.get('configurations', {}))}")
        self.plan = plan
        self.config_name = config_name
        self.config = plan["configurations"][config_name]
        self.device = resolve_device(device)
        self.options = options or InferenceOptions()
        if not 0.0 <= self.options.overlap < 1.0:
            raise ConfigError("--overlap", self.options.overlap, "a fraction in [0, 1)")
        self.amp_dtype = _amp_dtype(self.options.amp, self.device)
        self.postprocessing = postprocessing or PostprocessSetting()
        self.num_classes = int(plan["num_classes"])
        self.labels = labels or {int(k): v for k, v in plan.get("labels", {}).items()}
        self.networks = [n.to(self.device).eval() for n in networks]
        self.slicewise = bool(self.config.get("slicewise", False)) and int(plan["spatial_dims"]) == 3
        self.patch_size = tuple(int(p) for p in self.config["patch_size"])
        self.mirror_axes = tuple(self.config.get("mirror_axes", ())) if self.options.tta else ()
        self.batch_size = int(self.options.batch_size or min(int(self.config.get("batch_size", 2)), 8))
        self.valid_crop = _valid_crop(self.networks[0], self.patch_size, int(plan["in_channels"]), self.device)
        self._compiled = not self.options.compile  # compiled at the first prediction, not for an empty batch

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_run(cls, model_dir: str | Path, folds: Sequence[int] | None = None,
                 device: str | torch.device | None = None, **options: Any) -> Predictor:
        """Load the folds of a run folder (``model.json``, ``plan.json``, ``fold_K/checkpoint_*.pt``).

        Args:
            model_dir: the run folder written by ``medseg crossval`` (or ``medseg train`` for one fold).
            folds: folds to ensemble; default: the folds listed in ``model.json`` (else every ``fold_K``).
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; default CUDA when available.
            **options: fields of :class:`InferenceOptions` (``tta``, ``overlap``, ``batch_size``, ``amp``,
                ``postprocess``, ``checkpoint``, ``compile``).

        Returns:
            A ready Predictor.

        Raises:
            InputError: missing or unreadable files, a requested fold that is absent.
            ConfigError: invalid options.
        """
        from medseg.planning import load_plan

        root = Path(model_dir)
        if not root.is_dir():
            raise InputError(root, "is not a folder", "a run folder with model.json, plan.json and fold_K/")
        model = _read_json(root / "model.json", "model.json") if (root / "model.json").exists() else {}
        plan = load_plan(root / "plan.json")
        opts = InferenceOptions(**options)
        if opts.checkpoint not in ("best", "latest"):
            raise ConfigError("checkpoint", opts.checkpoint, "'best' or 'latest'")
        available = sorted(int(p.name[5:]) for p in root.glob("fold_*") if p.is_dir() and p.name[5:].isdigit())
        if folds is None:
            folds = [int(f) for f in model.get("folds", [])] or available
        missing = [f for f in folds if f not in available]
        if missing or not folds:
            raise InputError(root, f"has no trained fold(s) {missing or 'at all'}",
                             f"folds among {available}" if available else "fold_K/checkpoint_best.pt files")
        ckpts = {f: _checkpoint_path(root / f"fold_{f}", opts.checkpoint) for f in folds}
        first = _load_checkpoint(ckpts[folds[0]])
        # model.json names the configuration; without it (a bare fold folder) the checkpoint or a one-config plan
        config_name = model.get("configuration") or first.get("configuration")
        if config_name is None and len(plan["configurations"]) == 1:
            config_name = next(iter(plan["configurations"]))
        cfg = plan["configurations"].get(config_name) if config_name else None
        if cfg is None:
            raise InputError(root / "model.json", f"configuration {config_name!r} is not one of plan.json's",
                             f"a model.json naming one of {sorted(plan['configurations'])}")
        dims = 2 if cfg.get("slicewise") or int(plan["spatial_dims"]) == 2 else 3
        dev = resolve_device(device)
        networks = []
        for f in folds:
            ckpt_path = ckpts[f]
            ckpt = first if f == folds[0] else _load_checkpoint(ckpt_path)
            spec = ckpt.get("network") or model.get("network")
            if not spec or "name" not in spec:
                raise InputError(ckpt_path, "records no network", 'a checkpoint with {"network": {"name", "kwargs"}}')
            net = build_network(spec, spatial_dims=dims, in_channels=int(plan["in_channels"]),
                                out_channels=int(plan["num_classes"]))
            try:
                net.load_state_dict(ckpt["state_dict"])
            except (KeyError, RuntimeError) as exc:
                raise InputError(ckpt_path, f"weights do not fit the network ({str(exc).splitlines()[0]})",
                                 "a checkpoint of this run's network") from None
            networks.append(net)
            log.info("loaded fold %d from %s", f, ckpt_path.name)
        setting = load_postprocessing(root) if opts.postprocess else PostprocessSetting()
        labels = {int(k): v for k, v in (model.get("labels") or plan.get("labels") or {}).items()}
        pred = cls(networks, plan, config_name, device=dev, options=opts, postprocessing=setting, labels=labels)
        pred.folds = list(folds)
        pred.model_dir = root
        return pred

    # ------------------------------------------------------------------------------------------ predicting
    def predict(self, volume: Volume) -> Volume:
        """Predict the label map of ``volume``.

        Args:
            volume: the input image (all channels), in any orientation and spacing.

        Returns:
            ``(1, *spatial)`` integer Volume with ``volume``'s exact geometry (uint8 up to 255 classes).

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
        from medseg.transforms.preprocess import preprocess_volume, restore_original

        image, _, props = preprocess_volume(volume, self.plan, self.config_name)
        prob = self.predict_array(image)
        label = argmax_label(prob).cpu().numpy()
        dtype = np.uint8 if self.num_classes <= 256 else np.int16
        label = restore_original(label, props, is_label=True).astype(dtype)
        if self.options.postprocess and not self.postprocessing.is_identity:
            label = postprocess(label, self.postprocessing, volume.spacing)
        meta = {k: v for k, v in volume.meta.items() if k not in ("intent", "disk_dtype")}
        out = Prediction(Volume(label, volume.affine.copy(), volume.spatial_dims, {**meta, "kind": "label"}))
        if uncertainty:
            ent = entropy(prob).cpu().numpy()
            ent = restore_original(ent, props, is_label=False).astype(np.float32)
            out.uncertainty = Volume(ent, volume.affine.copy(), volume.spatial_dims, {**meta, "kind": "entropy"})
        if probabilities:
            p = restore_original(prob.cpu().numpy(), props, is_label=False).astype(np.float32)
            out.probabilities = Volume(p, volume.affine.copy(), volume.spatial_dims, {**meta, "kind": "probabilities"})
        return out

    def predict_array(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Class probabilities of a preprocessed plan-space image, averaged over mirrors and folds.

        Args:
            image: ``(C, *spatial)`` float32 in plan space.

        Returns:
            ``(K, *spatial)`` float32 probabilities (on the accumulation device).
        """
        if not self._compiled:
            from medseg.inference.compiled import compile_for_inference

            shape = (self.batch_size, int(self.plan["in_channels"]), *self.patch_size)
            self.networks = [compile_for_inference(n, shape, self.device, self.amp_dtype) for n in self.networks]
            self._compiled = True
        image_t = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image)
        kw = dict(patch_size=self.patch_size, overlap=self.options.overlap, mirror_axes=self.mirror_axes,
                  batch_size=self.batch_size, device=self.device, amp_dtype=self.amp_dtype,
                  valid_crop=self.valid_crop if any(self.valid_crop) else None, activation="softmax")
        total = None
        for i, net in enumerate(self.networks):
            if self.slicewise:
                p = sliding_window_predict_slices(net, image_t, slice_axis=int(self.config.get("slice_axis", 2)), **kw)
            else:
                p = sliding_window_predict(net, image_t, **kw)
            total = p if total is None else total.add_(p.to(total.device))
            log.debug("fold %d of %d done", i + 1, len(self.networks))
        return total.div_(len(self.networks))

    def __repr__(self) -> str:
        return (f"Predictor(config={self.config_name!r}, folds={getattr(self, 'folds', len(self.networks))}, "
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


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise InputError(path, f"cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                         "a checkpoint written by `medseg train` (loaded with weights_only=True)") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise InputError(path, "is not a medseg checkpoint (no state_dict)", "a checkpoint written by `medseg train`")
    return ckpt
