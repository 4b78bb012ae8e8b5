"""Parameter counts and training-memory estimates, so the planner can fit a patch and batch to a budget.

:func:`estimate_memory` runs a real training step (forward, cross-entropy on every output, backward,
optimiser step, the optimiser state already allocated) on *fake* tensors
(``torch._subclasses.FakeTensorMode``: shapes and dtypes, no data, no compute) while a dispatch mode follows every tensor storage from allocation to release. The result is the
peak of live tensor bytes: parameters, gradients, optimiser state, saved activations and backward
temporaries, with bf16/fp16 autocast taken into account. :func:`measure_peak_memory` runs the same step for
real and reads the allocator: the CPU profiler's memory events, or ``torch.cuda.max_memory_allocated``.
Estimates ignore allocator overhead (CUDA caching, cuDNN/oneDNN workspaces).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from medseg.errors import ConfigError
from medseg.networks.registry import create_model

__all__ = ["count_parameters", "estimate_memory", "measure_peak_memory", "OPTIMIZERS"]

logger = logging.getLogger(__name__)

#: Optimisers the memory functions simulate (nnU-Net trains with SGD + Nesterov momentum).
OPTIMIZERS = ("sgd", "adamw", "none")


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``model``.

    Args:
        model: any module.
        trainable_only: count only parameters with ``requires_grad``.

    Returns:
        The parameter count.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class _LiveBytes(TorchDispatchMode):
    """Follows every storage produced by an op until its last tensor dies; records the peak of live bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage id -> [nbytes, live tensors]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.live[key][1] += 1
        weakref.finalize(tensor, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def _amp_dtype(dtype: torch.dtype) -> torch.dtype | None:
    if dtype == torch.float32:
        return None
    if dtype in (torch.bfloat16, torch.float16):
        return dtype
    raise ConfigError("dtype", dtype, "torch.float32, or torch.bfloat16 / torch.float16 (autocast)")


def _make_optimizer(name: str, params) -> torch.optim.Optimizer | None:
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.99, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3)
    if name == "none":
        return None
    raise ConfigError("optimizer", name, "one of " + ", ".join(OPTIMIZERS))


def _step(
    model: nn.Module,
    image: torch.Tensor,
    label: torch.Tensor | None,
    optimizer: torch.optim.Optimizer | None,
    amp: torch.dtype | None,
    device_type: str,
) -> None:
    """One training step (training mode) or one inference forward (eval mode, no grad)."""
    if label is None:
        with torch.no_grad(), torch.autocast(device_type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            model(image)
        return
    with torch.autocast(device_type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        outputs = model(image)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    loss = 0.0
    for out in outputs:
        target = label
        if tuple(out.shape[2:]) != tuple(label.shape[1:]):
            target = nn.functional.interpolate(label[:, None].float(), size=out.shape[2:], mode="nearest")[:, 0].long()
        loss = loss + nn.functional.cross_entropy(out.float(), target)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _init_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Create the optimiser state (momentum / moments) as after a first step, without a forward pass."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _check_args(patch_size: Sequence[int], spatial_dims: int, batch_size: int) -> None:
    if len(patch_size) != spatial_dims or min(patch_size) < 1:
        raise ConfigError("patch_size", list(patch_size), f"{spatial_dims} positive sizes")
    if batch_size < 1:
        raise ConfigError("batch_size", batch_size, "a positive integer")


def _output_spatial(model: nn.Module, patch_size: Sequence[int]) -> tuple[int, ...]:
    return tuple(model.output_shape(tuple(patch_size)))  # every create_model network declares it


def estimate_memory(
    name: str,
    kwargs: Mapping[str, Any],
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    patch_size: Sequence[int],
    batch_size: int,
    dtype: torch.dtype = torch.float32,
    training: bool = True,
    optimizer: str = "sgd",
) -> int:
    """Peak tensor memory, in bytes, of one training step (or one inference forward) of a registered model.

    Counts parameters, gradients, optimiser state (SGD momentum: 1 copy of the parameters; AdamW: 2), the
    activations saved for backward and the backward/loss temporaries, by simulating one step (optimiser
    state already allocated) on fake tensors: no compute, a second or two for an nnU-Net-sized 3D network.
    Measured CPU peaks agree within 10% (``benchmarks/bench_network_memory.py``); allocator overhead (CUDA
    caching, cuDNN/oneDNN workspaces) is not included, so leave a margin on GPU.

    Args:
        name: registered model name.
        kwargs: the model's options (as stored in the plan).
        spatial_dims, in_channels, out_channels: as for :func:`~medseg.networks.create_model`.
        patch_size: spatial patch size.
        batch_size: patches per batch.
        dtype: ``torch.float32``, or ``torch.bfloat16`` / ``torch.float16`` for autocast mixed precision.
        training: a training step (True) or an inference forward under ``no_grad`` (False).
        optimizer: ``"sgd"`` (momentum, as nnU-Net), ``"adamw"`` or ``"none"``.

    Returns:
        Estimated peak bytes.

    Raises:
        ConfigError: invalid model options, patch, batch, dtype or optimiser.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    _check_args(patch_size, spatial_dims, batch_size)
    amp = _amp_dtype(dtype)
    if optimizer not in OPTIMIZERS:
        raise ConfigError("optimizer", optimizer, "one of " + ", ".join(OPTIMIZERS))
    tracker = _LiveBytes()
    with FakeTensorMode(allow_non_fake_inputs=False):
        with tracker:
            model = create_model(
                name, spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **dict(kwargs)
            )
            model.train(training)
            image = torch.empty((batch_size, in_channels, *patch_size))
            label = None
            opt = None
            if training:
                out_shape = _output_spatial(model, patch_size)
                label = torch.zeros((batch_size, *out_shape), dtype=torch.long)
                opt = _make_optimizer(optimizer, model.parameters())
            if opt is not None:
                _init_optimizer_state(model, opt)
            _step(model, image, label, opt, amp, "cpu")
            peak = tracker.peak
    logger.debug("estimated peak for %s patch %s batch %d: %.1f MiB", name, list(patch_size), batch_size, peak / 2**20)
    return int(peak)


def measure_peak_memory(
    name: str,
    kwargs: Mapping[str, Any],
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    patch_size: Sequence[int],
    batch_size: int,
    dtype: torch.dtype = torch.float32,
    training: bool = True,
    optimizer: str = "sgd",
    device: str = "cpu",
    seed: int = 0,
) -> int:
    """Measured peak tensor memory, in bytes, of the step that :func:`estimate_memory` simulates.

    On CPU the peak is read from the profiler's allocation events (``profile_memory=True``); on CUDA from
    ``torch.cuda.max_memory_allocated`` (after a reset). The model, data and optimiser are created inside
    the measured window, so the value is comparable to the estimate.

    Args:
        name, kwargs, spatial_dims, in_channels, out_channels, patch_size, batch_size, dtype, training,
            optimizer: as for :func:`estimate_memory`.
        device: ``"cpu"`` or ``"cuda"``.
        seed: seed of the random input and labels.

    Returns:
        Measured peak bytes.

    Raises:
        ConfigError: invalid arguments.
    """
    _check_args(patch_size, spatial_dims, batch_size)
    amp = _amp_dtype(dtype)
    device_type = torch.device(device).type
    gen = torch.Generator().manual_seed(seed)

    def run() -> None:
        model = create_model(
            name, spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **dict(kwargs)
        ).to(device)
        model.train(training)
        image = torch.randn((batch_size, in_channels, *patch_size), generator=gen).to(device)
        label = opt = None
        if training:
            out_shape = _output_spatial(model, patch_size)
            label = torch.randint(0, out_channels, (batch_size, *out_shape), generator=gen).to(device)
            opt = _make_optimizer(optimizer, model.parameters())
        if opt is not None:
            _init_optimizer_state(model, opt)
        _step(model, image, label, opt, amp, device_type)

    if device_type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    if device_type != "cpu":
        raise ConfigError("device", device, '"cpu" or "cuda"')
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return int(peak)
