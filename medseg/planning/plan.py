"""Fingerprint -> plan: target spacing, normalisation, configurations (patch, batch, network), mirror axes.

The plan is plain, versioned JSON; everything downstream (preprocessing, loader, trainer, inference) reads it.
Patch and batch are fitted to a budget: on ``device="cuda"`` an estimate of training activation memory against
``memory_gb`` (default 8 GB); on ``device="cpu"`` a compute budget in voxels per batch, sized so one bf16 training
step of the small CPU network takes about a second on a 2-core AVX512 machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import ConfigError, InputError
from medseg.planning.schema import SCHEMA_VERSION, Configuration, NetworkSpec, Normalization, Plan
from medseg.planning.topology import Topology, pool_and_conv_props

__all__ = ["make_plan", "save_plan", "load_plan", "plan_hash", "target_spacing", "estimate_training_memory",
           "PLAN_VERSION"]

log = logging.getLogger(__name__)

PLAN_VERSION = SCHEMA_VERSION

#: CPU compute budget: voxels per training batch (8 x 40x56x40 hippocampus patches ~ 0.9 s/step in bf16).
CPU_BATCH_VOXELS = {3: 750_000, 2: 2_000_000}
#: Feature widths: (first stage, cap) per device and dimensionality.
FEATURES = {("cpu", 3): (16, 128), ("cpu", 2): (16, 256), ("cuda", 3): (32, 320), ("cuda", 2): (32, 512)}
MAX_BATCH = {("cpu", 3): 8, ("cpu", 2): 64, ("cuda", 3): 64, ("cuda", 2): 512}
#: Bytes of activation memory per (voxel x feature) in one training step with AMP (calibrated so that nnU-Net's
#: default 128^3 x 2, 32-320 fits about 8 GB).
BYTES_PER_ACTIVATION = 44.0
ANISOTROPY_THRESHOLD = 3.0


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> list[float]:
    """Median spacing; for strongly anisotropic data the coarse axis takes its 10th percentile instead.

    Args:
        spacings: ``(n_cases, dims)`` voxel spacings.
        shapes: ``(n_cases, dims)`` shapes (to check the coarse axis also has few voxels, as nnU-Net does).

    Returns:
        Target spacing per axis.
    """
    spacings = np.asarray(spacings, dtype=float)
    target = np.median(spacings, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    if not others:
        return [float(t) for t in target]
    median_shape = np.median(np.asarray(shapes, dtype=float), axis=0) * np.median(spacings, axis=0) / target
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[others])
    aniso_voxels = median_shape[worst] * ANISOTROPY_THRESHOLD < min(median_shape[others])
    if aniso_spacing and aniso_voxels:
        t = float(np.percentile(spacings[:, worst], 10))
        target[worst] = max(t, max(target[others]) + 1e-5)
    return [float(t) for t in target]


def estimate_training_memory(patch_size: list[int], topo: Topology, features: list[int], batch_size: int) -> float:
    """Approximate activation memory (bytes) of one U-Net training step (encoder + decoder, AMP).

    Args:
        patch_size: patch per axis.
        topo: its topology.
        features: channels per stage.
        batch_size: samples per batch.

    Returns:
        Estimated bytes.
    """
    size = np.array(patch_size, dtype=float)
    total = 0.0
    for stride, f in zip(topo.strides, features):
        size = np.ceil(size / np.array(stride))
        total += float(np.prod(size)) * f
    return total * BYTES_PER_ACTIVATION * batch_size


def _features(n_stages: int, device: str, dims: int) -> list[int]:
    base, cap = FEATURES[(device, dims)]
    return [int(min(base * 2**i, cap)) for i in range(n_stages)]


def _fit(median_shape: np.ndarray, spacing: list[float], device: str, memory_gb: float,
         dataset_voxels: float) -> Configuration:
    dims = len(spacing)
    sp = np.asarray(spacing, dtype=float)
    tmp = 1.0 / sp
    edge = 256.0 if dims == 3 else 2048.0
    initial = np.round(tmp * (edge**dims / np.prod(tmp)) ** (1.0 / dims))
    patch = [int(max(1, v)) for v in np.minimum(initial, np.ceil(median_shape))]
    max_pool = 5 if dims == 3 else 6

    def cost(p: list[int], topo: Topology, batch: int) -> float:
        if device == "cpu":
            return float(np.prod(p)) * batch
        return estimate_training_memory(p, topo, _features(len(topo.strides), device, dims), batch)

    budget = CPU_BATCH_VOXELS[dims] if device == "cpu" else memory_gb * 1024**3
    topo = pool_and_conv_props(spacing, patch, 4, max_pool)
    while cost(topo.patch_size, topo, 2) > budget:
        ratio = np.array(topo.patch_size) / np.maximum(median_shape, 1)
        axis = int(np.argmax(ratio))
        shrunk = list(topo.patch_size)
        shrunk[axis] -= topo.divisible_by[axis]
        if shrunk[axis] < 4:
            break
        topo = pool_and_conv_props(spacing, shrunk, 4, max_pool)
    patch = topo.patch_size
    batch = int(np.floor(budget / max(cost(patch, topo, 1), 1.0)))
    five_percent = int(round(dataset_voxels * 0.05 / float(np.prod(patch))))
    if device == "cuda":  # nnU-Net's cap: one batch covers at most 5% of the data set's voxels
        batch = min(batch, five_percent)
    batch = int(max(2, min(batch, MAX_BATCH[(device, dims)])))
    features = _features(len(topo.strides), device, dims)
    return Configuration(
        spacing=[float(s) for s in spacing],
        patch_size=[int(p) for p in patch],
        batch_size=batch,
        median_shape=[int(round(s)) for s in median_shape],
        network=NetworkSpec("unet", {
            "features": features,
            "strides": topo.strides,
            "kernel_sizes": topo.kernel_sizes,
            "deep_supervision": True,
            "norm": "instance",
        }),
        pools_per_axis=list(topo.pools_per_axis),
        mirror_axes=list(range(dims)),
        estimated_memory_gb=round(estimate_training_memory(patch, topo, features, batch) / 1024**3, 3),
    )


def make_plan(fingerprint: dict[str, Any], *, device: str = "cpu", memory_gb: float | None = None) -> Plan:
    """Turn a fingerprint into a plan.

    Args:
        fingerprint: from :func:`medseg.planning.fingerprint`.
        device: ``"cpu"`` (small network, compute-bounded batch) or ``"cuda"`` (memory-bounded).
        memory_gb: GPU memory budget for ``cuda`` (default 8).

    Returns:
        The typed :class:`~medseg.planning.schema.Plan` (see docs/architecture.md).

    Raises:
        ConfigError: unknown device or a non-positive memory budget.
    """
    if device not in ("cpu", "cuda"):
        raise ConfigError("device", device, "'cpu' or 'cuda'")
    if memory_gb is not None and memory_gb <= 0:
        raise ConfigError("memory_gb", memory_gb, "a positive number of gigabytes")
    gb = float(memory_gb) if memory_gb is not None else 8.0
    dims = int(fingerprint["spatial_dims"])
    spacings = np.asarray(fingerprint["spacings"], dtype=float)
    cropped = np.asarray(fingerprint["cropped_shapes"], dtype=float)
    target = target_spacing(spacings, cropped)
    shapes_at_target = cropped * spacings / np.asarray(target)
    median_shape = np.median(shapes_at_target, axis=0)
    dataset_voxels = float(np.sum(np.prod(shapes_at_target, axis=1)))

    normalization = []
    use_nonzero = fingerprint.get("median_crop_fraction", 1.0) < 0.75
    for c, mod in enumerate(fingerprint["modalities"]):
        st = fingerprint["intensity"][c]
        if str(mod).upper() == "CT":
            normalization.append(Normalization("ct", float(st["mean"]), float(st["std"]),
                                               [float(st["percentile_00_5"]), float(st["percentile_99_5"])]))
        else:
            normalization.append(Normalization("zscore_nonzero" if use_nonzero else "zscore"))

    configs: dict[str, Configuration] = {}
    if dims == 3:
        configs["3d_fullres"] = _fit(median_shape, target, device, gb, dataset_voxels)
        # 2D: slices across the coarsest axis (ties: the last, axial in RAS); that axis is not resampled
        tgt = np.asarray(target)
        slice_axis = int(np.flatnonzero(tgt == tgt.max())[-1])
        inplane = [a for a in range(3) if a != slice_axis]
        two = _fit(median_shape[inplane], [target[a] for a in inplane], device, gb, dataset_voxels)
        two.spacing = [None if a == slice_axis else float(target[a]) for a in range(3)]
        two.slicewise = True
        two.slice_axis = slice_axis
        configs["2d"] = two
    else:
        configs["2d"] = _fit(median_shape, target, device, gb, dataset_voxels)

    labels = {int(k): str(v) for k, v in fingerprint["labels"].items()}
    fp_summary = {k: v for k, v in fingerprint.items() if k not in ("spacings", "shapes", "cropped_shapes",
                                                                    "case_ids")}
    fp_summary["median_spacing"] = [float(v) for v in np.median(spacings, axis=0)]
    fp_summary["median_shape"] = [float(v) for v in np.median(np.asarray(fingerprint["shapes"]), axis=0)]
    return Plan(
        dataset=str(fingerprint["dataset"]),
        spatial_dims=dims,
        in_channels=int(fingerprint["channels"]),
        num_classes=max(labels) + 1,
        labels=labels,
        device=device,
        memory_gb=gb if device == "cuda" else None,
        normalization=normalization,
        configurations=configs,
        fingerprint=fp_summary,
    )


def plan_hash(plan: Plan) -> str:
    """Short sha256 of what preprocessing depends on (schema, channels, normalisation, per-config spacing).

    Batch size, patch size or network changes keep the hash, so they reuse the same preprocessed cache.
    """
    key = {
        "version": plan.schema_version, "spatial_dims": plan.spatial_dims, "in_channels": plan.in_channels,
        "normalization": [n.to_dict() for n in plan.normalization],
        "manifest": plan.fingerprint.get("manifest_hash"),
        "configurations": {n: {"spacing": c.spacing, "slice_axis": c.slice_axis}
                           for n, c in sorted(plan.configurations.items())},
    }
    if list(plan.label_values) != list(range(plan.num_classes)):  # cached labels hold class indices of these values
        key["label_values"] = [int(v) for v in plan.label_values]
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_plan(plan: Plan, path: str | Path) -> None:
    """Write a plan as indented JSON (atomically)."""
    from medseg.io import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(plan.to_dict(), indent=2) + "\n")


def load_plan(path: str | Path) -> Plan:
    """Read, validate and (for first-release files) migrate a plan file.

    Raises:
        InputError: missing, not JSON, a newer version, missing keys or values of the wrong type.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "does not exist", "a plan.json written by `medseg plan`") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"is not valid JSON ({str(exc).splitlines()[0]})",
                         "a plan.json written by `medseg plan`") from None
    return Plan.from_dict(data, path)
