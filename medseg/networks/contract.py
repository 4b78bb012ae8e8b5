"""The declared contract of a medseg network, and the valid-convolution crop arithmetic built on it.

Every network returned by :func:`medseg.networks.create_model` satisfies :class:`SegmentationNetwork`:
training, inference and memory estimation read these attributes instead of probing the network with a dummy
forward pass.

```python
net = create_model("classic_unet", spatial_dims=2, in_channels=1, out_channels=2)
isinstance(net, SegmentationNetwork)      # True
net.output_shape((572, 572))              # (388, 388): valid convolutions lose 92 voxels per side
valid_crop(net, (572, 572))               # (92, 92)
```
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from medseg.errors import ConfigError

__all__ = ["SegmentationNetwork", "SameShape", "conform", "valid_crop"]


@runtime_checkable
class SegmentationNetwork(Protocol):
    """What a medseg network offers (a structural type: ``isinstance(net, SegmentationNetwork)`` works).

    Attributes:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes; the logits' channel axis).
        deep_supervision: whether training-mode ``forward`` returns a list of outputs.
        medseg_spec: the ``{"name", "kwargs"}`` that rebuilds the network (set by ``create_model``).
        deep_supervision_scales: downsampling factor per axis of each training-mode output, full resolution
            first; its length is the number of outputs (1 without deep supervision).
    """

    spatial_dims: int
    in_channels: int
    out_channels: int
    deep_supervision: bool
    medseg_spec: dict[str, Any]

    @property
    def deep_supervision_scales(self) -> list[tuple[int, ...]]:
        """Downsampling factor per axis of each training-mode output."""
        ...

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial shape of the full-resolution logits for a spatial input shape (no forward pass)."""
        ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits ``(B, K, *spatial)``; with deep supervision in training mode a list, full resolution first."""
        ...


class SameShape:
    """``output_shape`` of a same-padded network: the output has the input's spatial shape.

    A small callable object rather than a bound method, so a network holding it still pickles and deep-copies.

    Args:
        spatial_dims: 2 or 3.
        divisor: every spatial size must be a multiple of it (e.g. 32 for Swin-UNETR); 1 accepts any size.
        min_size: the smallest size per axis (e.g. 16 for four 2x poolings); defaults to ``divisor``.
        name: the network's name, for error messages.
    """

    def __init__(self, spatial_dims: int, divisor: int = 1, min_size: int | None = None, name: str = "network"):
        self.spatial_dims = spatial_dims
        self.divisor = divisor
        self.min_size = divisor if min_size is None else min_size
        self.name = name

    def __call__(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """The input shape itself.

        Args:
            input_shape: spatial input shape.

        Returns:
            ``tuple(input_shape)``.

        Raises:
            ConfigError: wrong number of axes, a size below ``min_size`` or not a multiple of ``divisor``.
        """
        shape = tuple(int(n) for n in input_shape)
        if len(shape) != self.spatial_dims:
            raise ConfigError("input_shape", list(shape), f"{self.spatial_dims} spatial sizes")
        if min(shape) < max(self.min_size, 1) or any(n % self.divisor for n in shape):
            expected = f"sizes of at least {self.min_size}" if self.divisor == 1 else f"sizes divisible by {self.divisor}"
            raise ConfigError("input_shape", list(shape), f"{expected} for {self.name}")
        return shape

    def __repr__(self) -> str:
        return f"SameShape(spatial_dims={self.spatial_dims}, divisor={self.divisor}, min_size={self.min_size})"


def conform(
    model: nn.Module, *, name: str, spatial_dims: int, in_channels: int, out_channels: int, spec: dict[str, Any]
) -> nn.Module:
    """Make ``model`` satisfy :class:`SegmentationNetwork` (what ``create_model`` does to every network).

    Dimensions and channel counts the network declares itself are checked against the request; missing
    attributes are set: the channel counts, ``deep_supervision`` from the options (default ``False``), one full-resolution
    ``deep_supervision_scales`` entry, and a same-padding :class:`SameShape` ``output_shape``.

    Args:
        model: the freshly built network.
        name: its registry name.
        spatial_dims, in_channels, out_channels: what was requested.
        spec: its ``{"name", "kwargs"}`` spec, stored as ``medseg_spec``.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: when the network declares values that contradict the request, or declares deep
            supervision without ``deep_supervision_scales`` (a programming error in its builder).
    """
    requested = {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels}
    for attr, value in requested.items():
        if not hasattr(model, attr):
            setattr(model, attr, value)
        elif getattr(model, attr) != value:
            raise ValueError(f"model {name!r} declares {attr}={getattr(model, attr)!r} but {value!r} was requested")
    if not hasattr(model, "deep_supervision"):
        model.deep_supervision = bool(spec["kwargs"].get("deep_supervision", False))
    if not hasattr(model, "deep_supervision_scales"):
        if model.deep_supervision:
            raise ValueError(f"model {name!r} has deep supervision but declares no deep_supervision_scales")
        model.deep_supervision_scales = [(1,) * spatial_dims]
    if not hasattr(model, "output_shape"):
        model.output_shape = SameShape(spatial_dims, name=name)
    model.medseg_spec = spec
    if not isinstance(model, SegmentationNetwork):  # every member is set above; a guard against future members
        raise ValueError(f"model {name!r} does not satisfy medseg.networks.SegmentationNetwork")
    return model


def valid_crop(network: SegmentationNetwork, patch: Sequence[int]) -> tuple[int, ...]:
    """Voxels a network loses on each side of every axis for an input patch (all 0 for same padding).

    Computed from ``network.output_shape`` (no forward pass); the output must be centred in the input.

    Args:
        network: a network satisfying :class:`SegmentationNetwork`.
        patch: spatial input (patch) shape.

    Returns:
        ``(patch - output) / 2`` per axis.

    Raises:
        ConfigError: when the patch is too small for the network, or an axis loses an odd number of voxels
            (the output would not be centred: choose a patch one voxel larger or smaller).
        TypeError: when ``network`` has no ``output_shape`` (not built by ``create_model``).
    """
    if not callable(getattr(network, "output_shape", None)):
        raise TypeError(f"{type(network).__name__} has no output_shape; build networks with create_model")
    patch_t = tuple(int(p) for p in patch)
    out = tuple(network.output_shape(patch_t))
    crop = []
    for axis, (p, o) in enumerate(zip(patch_t, out)):
        loss = p - o
        if loss < 0 or loss % 2:
            raise ConfigError(
                "patch_size", list(patch_t),
                f"a patch whose network output is centred: axis {axis} maps {p} -> {o} voxels, an odd loss "
                f"of {loss} (use a size one voxel larger or smaller)" if loss > 0 else
                f"a network whose output is not larger than its input (axis {axis}: {p} -> {o})",
            )
        crop.append(loss // 2)
    return tuple(crop)
