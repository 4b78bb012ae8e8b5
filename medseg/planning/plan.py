"""Fingerprint -> plan: target spacing, normalisation, configurations (patch, batch, network), mirror axes.

The plan is plain, versioned JSON; everything downstream (preprocessing, loader, trainer, inference) reads it, and
``plan.explain`` records, for each choice, the fact that decided it (docs/planning.md). Patch and batch are fitted
to a budget: on ``device="cuda"`` the GPU's free memory (or ``memory_gb``, default 11 GB without a GPU), checked with
the step-memory estimator of :mod:`medseg.networks.memory`; on ``device="cpu"`` a compute budget in voxels per
batch, sized so one bf16 training step of the small CPU network takes about a second on a 2-core AVX512 machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.regions import Region
from medseg.errors import ConfigError, InputError
from medseg.planning.mirror import choose_mirror_axes
from medseg.planning.normalization import choose_normalization
from medseg.planning.schema import SCHEMA_VERSION, Configuration, NetworkSpec, Plan
from medseg.planning.topology import Topology, pool_and_conv_props

__all__ = ["make_plan", "save_plan", "load_plan", "plan_hash", "target_spacing", "estimate_training_memory",
           "acquisition_permutation", "gpu_memory_gb", "PLAN_VERSION", "DEFAULT_GPU_MEMORY_GB"]

log = logging.getLogger(__name__)

PLAN_VERSION = SCHEMA_VERSION
#: Bumped when preprocessing computes different arrays from the same plan (2: separate-z resampling of anisotropic
#: cases), so caches made by an older release are not reused.
PREPROCESSING_VERSION = 2

#: CPU compute budget: voxels per training batch (8 x 40x56x40 hippocampus patches ~ 0.9 s/step in bf16).
CPU_BATCH_VOXELS = {3: 750_000, 2: 2_000_000}
#: Feature widths: (first stage, cap) per device and dimensionality.
FEATURES = {("cpu", 3): (16, 128), ("cpu", 2): (16, 256), ("cuda", 3): (32, 320), ("cuda", 2): (32, 512)}
MAX_BATCH = {("cpu", 3): 8, ("cpu", 2): 64, ("cuda", 3): 64, ("cuda", 2): 512}
#: GPU memory budget of a CUDA plan when no device is visible and none is given (GB; an 11 GB card is common).
DEFAULT_GPU_MEMORY_GB = 11.0
#: Share of the GPU budget a plan fills (the estimators leave out allocator caching and cuDNN workspaces).
GPU_MEMORY_MARGIN = 0.85
#: A case is anisotropic (planned in its acquisition frame) when its coarsest axis exceeds this x its finest.
COARSE_RATIO = 2.0
#: Plan ``3d_lowres`` when the full-resolution patch covers less than this share of the median image.
LOWRES_COVERAGE = 1 / 8
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


def acquisition_permutation(spacing: list[float] | np.ndarray) -> list[int]:
    """The axis order of a case's acquisition frame: its fine axes in RAS order, then its coarse axis.

    A case is anisotropic when its coarsest axis is more than :data:`COARSE_RATIO` times its finest; then the
    coarse axis goes last (``[1, 1, 6]`` -> ``[0, 1, 2]``, ``[6, 1, 1]`` -> ``[1, 2, 0]``). An isotropic case
    keeps the RAS order. Decided from the case's own spacing, so it applies to a new case at inference too.

    Args:
        spacing: the case's voxel spacing per RAS axis.

    Returns:
        The permutation: frame axis ``i`` is RAS axis ``perm[i]``.
    """
    sp = np.asarray(spacing, dtype=float)
    coarse = int(np.argmax(sp))
    if len(sp) != 3 or sp[coarse] <= COARSE_RATIO * sp.min():
        return list(range(len(sp)))
    return [a for a in range(3) if a != coarse] + [coarse]


def _frame(spacings: np.ndarray) -> tuple[str, list[list[int]], str]:
    """``ras`` when every anisotropic case is coarse along the same RAS axis, else ``acquisition``."""
    dims = spacings.shape[1]
    perms = [acquisition_permutation(sp) for sp in spacings]
    coarse = [int(np.argmax(sp)) for sp in spacings if sp.max() > COARSE_RATIO * sp.min()]
    counts = {a: coarse.count(a) for a in sorted(set(coarse))}
    if len(counts) <= 1:
        why = (f"all {len(coarse)} anisotropic cases are coarse along RAS axis {coarse[0]}" if coarse
               else f"no case has an axis more than {COARSE_RATIO:g}x coarser than its finest")
        return "ras", [list(range(dims))] * len(perms), why
    why = ("the anisotropic cases are coarse along different RAS axes (" +
           ", ".join(f"axis {a}: {n} cases" for a, n in counts.items()) +
           "): each case is planned in its acquisition frame, its coarse axis last")
    return "acquisition", perms, why


class _Sizer:
    """Fits patch, batch and network to one budget (CPU voxels per batch, or GPU memory)."""

    def __init__(self, device: str, memory_gb: float, memory_model: str, in_channels: int, num_classes: int,
                 dataset_voxels: float):
        self.device, self.memory_model = device, memory_model
        self.in_channels, self.num_classes, self.dataset_voxels = in_channels, num_classes, dataset_voxels
        self.memory_gb = memory_gb
        self.budget_gb = memory_gb * GPU_MEMORY_MARGIN

    def budget(self, dims: int) -> float:
        return CPU_BATCH_VOXELS[dims] if self.device == "cpu" else self.budget_gb * 1024**3

    def budget_text(self, dims: int) -> str:
        if self.device == "cpu":
            return f"the CPU budget of {CPU_BATCH_VOXELS[dims]:,} voxels per batch"
        how = "the step-memory estimator" if self.memory_model == "step" else "the analytic activation estimate"
        return (f"{self.budget_gb:.1f} GB ({100 * GPU_MEMORY_MARGIN:.0f}% of {self.memory_gb:.1f} GB, by {how}, "
                f"bf16)")

    def analytic_cost(self, patch: list[int], topo: Topology, batch: int) -> float:
        dims = len(patch)
        if self.device == "cpu":
            return float(np.prod(patch)) * batch
        return estimate_training_memory(patch, topo, _features(len(topo.strides), self.device, dims), batch)

    def fit_patch(self, median_shape: np.ndarray, spacing: list[float], scale: float = 1.0) -> Topology:
        """The largest patch (spacing's aspect, at most the median shape) whose analytic batch-2 cost, times
        ``scale`` (the step estimator's correction, on CUDA), fits."""
        dims = len(spacing)
        tmp = 1.0 / np.asarray(spacing, dtype=float)
        edge = 256.0 if dims == 3 else 2048.0
        initial = np.round(tmp * (edge**dims / np.prod(tmp)) ** (1.0 / dims))
        patch = [int(max(1, v)) for v in np.minimum(initial, np.ceil(median_shape))]
        topo = pool_and_conv_props(spacing, patch, 4, 5 if dims == 3 else 6)
        while self.analytic_cost(topo.patch_size, topo, 2) * scale > self.budget(dims):
            smaller = self._shrink(topo, median_shape, spacing)
            if smaller is None:
                break
            topo = smaller
        return topo

    def _shrink(self, topo: Topology, median_shape: np.ndarray, spacing: list[float]) -> Topology | None:
        dims = len(spacing)
        ratio = np.array(topo.patch_size) / np.maximum(median_shape, 1)
        axis = int(np.argmax(ratio))
        shrunk = list(topo.patch_size)
        shrunk[axis] -= topo.divisible_by[axis]
        if shrunk[axis] < 4:
            return None
        return pool_and_conv_props(spacing, shrunk, 4, 5 if dims == 3 else 6)

    def network(self, topo: Topology, dims: int) -> NetworkSpec:
        return NetworkSpec("unet", {"features": _features(len(topo.strides), self.device, dims),
                                    "strides": topo.strides, "kernel_sizes": topo.kernel_sizes,
                                    "deep_supervision": True, "norm": "instance"})

    def _step_bytes(self, net: NetworkSpec, patch: list[int], batch: int) -> float:
        import torch

        from medseg.networks.memory import estimate_memory

        return float(estimate_memory(net.name, net.kwargs, len(patch), self.in_channels, self.num_classes, patch,
                                     batch, dtype=torch.bfloat16))

    def fit(self, median_shape: np.ndarray, spacing: list[float]) -> tuple[Configuration, dict[str, str]]:
        """Patch, batch and network for ``spacing``; returns the configuration and why (patch, batch)."""
        dims = len(spacing)
        topo = self.fit_patch(median_shape, spacing)
        budget = self.budget(dims)
        step = self.device == "cuda" and self.memory_model == "step"
        if step:  # the step estimator decides: its ratio to the analytic cost re-fits the patch, then shrink
            # until its batch of 2 fits, then its per-sample bytes give the batch
            ratio = self._step_bytes(self.network(topo, dims), topo.patch_size, 2) / max(
                self.analytic_cost(topo.patch_size, topo, 2), 1.0)
            topo = self.fit_patch(median_shape, spacing, scale=ratio)
            for _ in range(12):
                net = self.network(topo, dims)
                one = self._step_bytes(net, topo.patch_size, 1)
                two = self._step_bytes(net, topo.patch_size, 2)
                smaller = self._shrink(topo, median_shape, spacing) if two > budget else None
                if smaller is None:
                    break
                topo = smaller
            per_sample, fixed = max(two - one, 1.0), one - max(two - one, 1.0)
            fits = int(np.floor((budget - fixed) / per_sample))
        else:
            fits = int(np.floor(budget / max(self.analytic_cost(topo.patch_size, topo, 1), 1.0)))
        patch = topo.patch_size
        batch, bound = fits, f"{fits} fit {self.budget_text(dims)}"
        if self.device == "cuda":  # nnU-Net's cap: one batch covers at most 5% of the data set's voxels
            five = int(round(self.dataset_voxels * 0.05 / float(np.prod(patch))))
            if five < batch:
                batch, bound = five, f"capped so one batch holds at most 5% of the data set's voxels ({fits} fit)"
        cap = MAX_BATCH[(self.device, dims)]
        if batch > cap:
            batch, bound = cap, f"the {self.device} maximum ({fits} fit {self.budget_text(dims)})"
        if batch < 2:
            batch, bound = 2, f"the minimum of 2 ({bound})"
        net = self.network(topo, dims)
        if step:
            est = fixed + per_sample * batch
        else:
            est = estimate_training_memory(patch, topo, net.kwargs["features"], batch)
        cfg = Configuration(
            spacing=[float(s) for s in spacing], patch_size=[int(p) for p in patch], batch_size=int(batch),
            median_shape=[int(round(s)) for s in median_shape], network=net,
            pools_per_axis=list(topo.pools_per_axis), mirror_axes=list(range(dims)),
            estimated_memory_gb=round(est / 1024**3, 3))
        cover = float(np.prod(patch) / max(1.0, float(np.prod(np.maximum(median_shape, 1)))))
        why = {
            "patch": (f"{_x(patch)}: the largest patch with the spacing's aspect, at most the median shape "
                      f"{_x([int(round(s)) for s in median_shape])} (padded to multiples of "
                      f"{_x(topo.divisible_by)}), whose batch of 2 fits {self.budget_text(dims)}; covers "
                      f"{100 * min(cover, 1.0):.0f}% of the median image"),
            "batch": f"{batch}: {bound}" + (f"; estimated {est / 1024**3:.2f} GB" if self.device == "cuda" else ""),
            "topology": _topology_text(topo, spacing),
        }
        return cfg, why


def _x(values: Any) -> str:
    return "x".join(str(int(v)) for v in values)


def _topology_text(topo: Topology, spacing: list[float]) -> str:
    text = (f"{len(topo.strides)} stages, pools per axis {topo.pools_per_axis} (an axis pools while its feature "
            f"map stays >= 8 and its spacing is within 2x of the finest)")
    dims = len(spacing)
    aniso = [a for a in range(dims) if topo.kernel_sizes[0][a] == 1]
    for a in aniso:
        k1 = sum(1 for k in topo.kernel_sizes if k[a] == 1)
        nopool = next((i for i, s in enumerate(topo.strides[1:]) if s[a] == 2), len(topo.strides) - 1)
        text += (f"; axis {a} ({spacing[a]:.3g} mm vs {min(spacing):.3g} mm): kernel 1 in the first {k1} stage(s) "
                 f"and no pooling in the first {nopool} downsampling(s), until its spacing evens out")
    return text


def _lowres(sizer: _Sizer, full: Configuration, median_shape: np.ndarray, spacing: list[float]
            ) -> tuple[Configuration | None, dict[str, str]]:
    """nnU-Net's low-resolution stage: coarsen the spacing (3% a step; while anisotropic only the fine axes)
    until the fitted patch covers at least :data:`LOWRES_COVERAGE` of the median image at that spacing."""
    full_voxels = float(np.prod(np.maximum(median_shape, 1)))
    cover = float(np.prod(full.patch_size)) / full_voxels
    if cover >= LOWRES_COVERAGE:
        return None, {"": (f"not planned: the 3d_fullres patch covers {100 * min(cover, 1):.0f}% of the median "
                           f"image (>= {100 * LOWRES_COVERAGE:.1f}%)")}
    low = np.asarray(spacing, dtype=float).copy()
    for _ in range(400):
        coarse = low.max() / low > 2
        if coarse.any():
            low[coarse] *= 1.03
        else:
            low *= 1.03
        shape = np.asarray(median_shape) * np.asarray(spacing) / low
        topo = sizer.fit_patch(shape, [float(v) for v in low])
        if np.prod(topo.patch_size) / np.prod(np.maximum(shape, 1)) >= LOWRES_COVERAGE:
            break
    if 2 * np.prod(shape) > full_voxels:
        return None, {"": "not planned: the low-resolution image would be less than 2x smaller than the full-resolution "
                          "one"}
    cfg, why = sizer.fit(shape, [float(v) for v in low])
    c2 = float(np.prod(cfg.patch_size) / np.prod(np.maximum(shape, 1)))
    why[""] = (f"planned: the 3d_fullres patch covers only {100 * cover:.1f}% of the median image (< "
               f"{100 * LOWRES_COVERAGE:.1f}%); at spacing {' x '.join(f'{v:.3g}' for v in low)} mm the patch "
               f"{_x(cfg.patch_size)} covers {100 * min(c2, 1):.0f}% of the median image "
               f"{_x([int(round(v)) for v in shape])}")
    return cfg, why


def gpu_memory_gb() -> tuple[float | None, str]:
    """Free memory of the current CUDA device in GB (``torch.cuda.mem_get_info``), or None without one."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None, "torch is not installed"
    if not torch.cuda.is_available():
        return None, "no CUDA device visible"
    free, total = torch.cuda.mem_get_info()
    name = torch.cuda.get_device_name()
    return free / 1024**3, f"{free / 1024**3:.1f} GB free of {total / 1024**3:.1f} GB on {name} (measured)"


def make_plan(fingerprint: dict[str, Any], *, device: str = "cpu", memory_gb: float | None = None,
              memory_model: str = "auto") -> Plan:
    """Turn a fingerprint into a plan; ``plan.explain`` says which fact decided each choice.

    Args:
        fingerprint: from :func:`medseg.planning.fingerprint`.
        device: ``"cpu"`` (small network, compute-bounded batch) or ``"cuda"`` (memory-bounded).
        memory_gb: GPU memory budget for ``cuda``; default: the free memory of the visible CUDA device, or
            :data:`DEFAULT_GPU_MEMORY_GB` without one.
        memory_model: how a CUDA plan's memory is estimated: ``"step"`` (a simulated training step,
            :func:`medseg.networks.memory.estimate_memory`; seconds per configuration), ``"analytic"`` (the fast
            activation formula :func:`estimate_training_memory`), ``"auto"`` (``step``).

    Returns:
        The typed :class:`~medseg.planning.schema.Plan` (see docs/planning.md).

    Raises:
        ConfigError: unknown device or memory model, or a non-positive memory budget.
    """
    if device not in ("cpu", "cuda"):
        raise ConfigError("device", device, "'cpu' or 'cuda'")
    if memory_model not in ("auto", "step", "analytic"):
        raise ConfigError("memory_model", memory_model, "'auto', 'step' or 'analytic'")
    if memory_gb is not None and memory_gb <= 0:
        raise ConfigError("memory_gb", memory_gb, "a positive number of gigabytes")
    explain: dict[str, str] = {}
    if memory_gb is not None:
        gb, explain["memory"] = float(memory_gb), f"{memory_gb:g} GB (given)"
    elif device == "cuda":
        measured, how = gpu_memory_gb()
        gb = measured if measured is not None else DEFAULT_GPU_MEMORY_GB
        explain["memory"] = how if measured is not None else f"{gb:g} GB (default, a common card; {how})"
    else:
        gb = DEFAULT_GPU_MEMORY_GB
    dims = int(fingerprint["spatial_dims"])
    values = [int(v) for v in fingerprint.get("label_values") or sorted(int(k) for k in fingerprint["labels"])]
    names = {int(k): str(v) for k, v in fingerprint["labels"].items()}
    labels = {k: names.get(v, f"label_{v}") for k, v in enumerate(values)}
    explain["labels"] = (f"{len(values)} classes for label values {values} (dataset.json and the values found in "
                         f"the label files); class k is written as label_values[k]")
    ignore = fingerprint.get("ignore_value")
    if ignore is not None:
        explain["labels"] += (f"; value {int(ignore)} is the ignore label ({fingerprint.get('ignored_voxels', 0)} "
                              "voxels): not a class, left out of the loss, patch sampling, statistics and metrics")
    if fingerprint.get("regions"):
        explain["regions"] = ("one sigmoid output per region (" + ", ".join(
            f"{r['name']}={r['values']}" for r in fingerprint["regions"]) + "), trained with BCE + Dice per region; "
            "predictions paint the regions in regions_class_order")

    spacings = np.asarray(fingerprint["spacings"], dtype=float)
    cropped = np.asarray(fingerprint["cropped_shapes"], dtype=float)
    frame, perms, frame_why = _frame(spacings) if dims == 3 else ("ras", [list(range(dims))] * len(spacings),
                                                                  "2D data")
    explain["frame"] = f"{frame}: {frame_why}"
    spacings_f = np.array([sp[p] for sp, p in zip(spacings, perms)])
    cropped_f = np.array([sh[p] for sh, p in zip(cropped, perms)])
    target = target_spacing(spacings_f, cropped_f)
    med = np.median(spacings_f, axis=0)
    worst = int(np.argmax(med))
    ratio = med[worst] / max(min(med), 1e-9)
    if not np.allclose(target, med):
        explain["spacing"] = (f"{_sp(target)} mm: the median spacing {_sp(med)} of {len(spacings)} cases, except "
                              f"axis {worst}, {ratio:.1f}x the finest (> {ANISOTROPY_THRESHOLD:g}x) with few voxels: "
                              f"the 10th percentile of its spacings")
    elif ratio > ANISOTROPY_THRESHOLD:
        explain["spacing"] = (f"{_sp(target)} mm: the median spacing of {len(spacings)} cases; axis {worst} is "
                              f"{ratio:.1f}x the finest and kept coarse (its 10th percentile is "
                              f"{np.percentile(spacings_f[:, worst], 10):.3g} mm, or it has many voxels)")
    else:
        explain["spacing"] = f"{_sp(target)} mm: the median spacing of {len(spacings)} cases"
    shapes_at_target = cropped_f * spacings_f / np.asarray(target)
    median_shape = np.median(shapes_at_target, axis=0)
    dataset_voxels = float(np.sum(np.prod(shapes_at_target, axis=1)))

    normalization = []
    for c in range(int(fingerprint["channels"])):
        norm, why = choose_normalization(fingerprint, c)
        normalization.append(norm)
        explain[f"normalization[{c}]"] = f"{norm.scheme}: {why}"

    model = "step" if memory_model == "auto" else memory_model
    sizer = _Sizer(device, gb, model, int(fingerprint["channels"]), len(values), dataset_voxels)
    mirror, mirror_why = choose_mirror_axes(fingerprint, perms, [labels[k] for k in range(1, len(values))], dims)
    explain["mirror_axes"] = f"{mirror}: {mirror_why}"
    configs: dict[str, Configuration] = {}
    if dims == 3:
        full, why = sizer.fit(median_shape, target)
        configs["3d_fullres"] = full
        explain.update({f"3d_fullres.{k}": v for k, v in why.items()})
        low, low_why = _lowres(sizer, full, median_shape, target)
        explain.update({"3d_lowres" + (f".{k}" if k else ""): v
                        for k, v in sorted(low_why.items(), key=lambda kv: kv[0] != "")})  # the summary first
        if low is not None:
            configs["3d_lowres"] = low
            if fingerprint.get("regions"):
                explain["3d_cascade_fullres"] = ("not planned: a cascade stage takes the 3d_lowres classes as one-hot "
                                                 "input channels, and region outputs overlap")
            else:  # nnU-Net's cascade: 3d_fullres's spacing, patch and network, plus the low-res prediction
                configs["3d_cascade_fullres"] = dataclasses.replace(full, previous_stage="3d_lowres")
                explain["3d_cascade_fullres"] = (
                    f"planned with 3d_lowres: 3d_fullres's spacing, patch and network, with the 3d_lowres prediction "
                    f"(upsampled, one-hot) as {len(values) - 1} extra input channel(s); trained when every fold "
                    f"is cross-validated (it learns from 3d_lowres's out-of-fold predictions)")
        # 2D: slices across the coarsest axis (ties: the last, axial in RAS); that axis is not resampled
        tgt = np.asarray(target)
        slice_axis = int(np.flatnonzero(tgt == tgt.max())[-1])
        inplane = [a for a in range(3) if a != slice_axis]
        two, why = sizer.fit(median_shape[inplane], [target[a] for a in inplane])
        two.spacing = [None if a == slice_axis else float(target[a]) for a in range(3)]
        two.slicewise = True
        two.slice_axis = slice_axis
        two.mirror_axes = [i for i, a in enumerate(inplane) if a in mirror]
        configs["2d"] = two
        explain.update({f"2d.{k}": v for k, v in why.items()})
        explain["2d.slices"] = f"across axis {slice_axis}, the coarsest (ties: the last)"
    else:
        configs["2d"], why = sizer.fit(median_shape, target)
        explain.update({f"2d.{k}": v for k, v in why.items()})
    for cfg in configs.values():
        cfg.frame = frame
        if not cfg.slicewise:
            cfg.mirror_axes = list(mirror)
    explain["configurations"] = ", ".join(configs) + ("" if "3d_lowres" in configs else
                                                      " (no 3d_lowres: " + explain.get("3d_lowres", "2D data") + ")")

    drop = ("spacings", "shapes", "cropped_shapes", "case_ids", "image_ranges", "class_offsets", "dicom_modalities")
    fp_summary = {k: v for k, v in fingerprint.items() if k not in drop}
    fp_summary["median_spacing"] = [float(v) for v in np.median(spacings, axis=0)]
    fp_summary["median_shape"] = [float(v) for v in np.median(np.asarray(fingerprint["shapes"]), axis=0)]
    return Plan(
        dataset=str(fingerprint["dataset"]),
        spatial_dims=dims,
        in_channels=int(fingerprint["channels"]),
        num_classes=len(values),
        labels=labels,
        device=device,
        memory_gb=gb if device == "cuda" else None,
        normalization=normalization,
        configurations=configs,
        fingerprint=fp_summary,
        label_values=values,
        explain=explain,
        ignore_value=None if ignore is None else int(ignore),
        regions=tuple(Region.from_dict(r) for r in fingerprint.get("regions") or []),
    )


def _sp(values: Any) -> str:
    return " x ".join(f"{float(v):.3g}" for v in values)


def plan_hash(plan: Plan) -> str:
    """Short sha256 of what preprocessing depends on (schema, channels, normalisation, per-config spacing).

    Batch size, patch size or network changes keep the hash, so they reuse the same preprocessed cache.
    """
    key = {
        "version": plan.schema_version, "preprocessing": PREPROCESSING_VERSION,
        "spatial_dims": plan.spatial_dims, "in_channels": plan.in_channels,
        "normalization": [n.to_dict() for n in plan.normalization],
        "manifest": plan.fingerprint.get("manifest_hash"),
        "configurations": {n: {"spacing": c.spacing, "slice_axis": c.slice_axis,
                               **({"frame": c.frame} if c.frame != "ras" else {})}  # RAS plans keep their hash
                           for n, c in sorted(plan.configurations.items())},
    }
    if list(plan.label_values) != list(range(plan.num_classes)):  # cached labels hold class indices of these values
        key["label_values"] = [int(v) for v in plan.label_values]
    if plan.ignore_value is not None:  # cached labels hold the ignore index there
        key["ignore_value"] = int(plan.ignore_value)
    if plan.regions:  # the cache's foreground locations are those of the regions' union
        key["regions"] = [r.to_dict() for r in plan.regions]
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
