"""Dimension-generic building blocks of the U-Net: convolution stages, residual stages, attention gates.

Layer classes come from MONAI's factories (``Conv[Conv.CONV, spatial_dims]``, ``get_norm_layer``,
``get_act_layer``), so one implementation serves 2D and 3D. Every block supports ``padding="valid"``
(unpadded convolutions, as in the 2015 U-Net paper) besides the default ``"same"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv, Dropout, Pool
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn

__all__ = [
    "NORMS",
    "conv_padding",
    "center_crop",
    "ConvNormAct",
    "ConvStage",
    "ResidualStage",
    "AttentionGate",
    "Downsample",
    "Upsample",
]

#: Norm names accepted by the U-Net (``"none"`` disables normalisation and turns convolution biases on).
NORMS = ("instance", "batch", "group", "none")


def conv_padding(kernel_size: Sequence[int], padding: str) -> tuple[int, ...]:
    """Padding that keeps the size (``"same"``, odd kernels) or none (``"valid"``).

    Args:
        kernel_size: kernel size per spatial axis.
        padding: ``"same"`` or ``"valid"``.

    Returns:
        The per-axis padding.
    """
    if padding == "valid":
        return tuple(0 for _ in kernel_size)
    return tuple((k - 1) // 2 for k in kernel_size)


def center_crop(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Centre-crop the spatial axes of ``x`` (B, C, *spatial) to ``shape`` (a view, no copy).

    Args:
        x: tensor to crop; every spatial size must be at least the target size.
        shape: target spatial shape.

    Returns:
        ``x`` itself when the shape already matches, else a sliced view.
    """
    spatial = x.shape[2:]
    if tuple(spatial) == tuple(shape):
        return x
    slices = [slice(None), slice(None)]
    for size, target in zip(spatial, shape):
        start = (size - target) // 2
        slices.append(slice(start, start + target))
    return x[tuple(slices)]


def _norm(norm: str, spatial_dims: int, channels: int, norm_groups: int) -> nn.Module:
    if norm == "none":
        return nn.Identity()
    if norm == "instance":
        return get_norm_layer(("instance", {"affine": True}), spatial_dims, channels)
    if norm == "group":
        return get_norm_layer(("group", {"num_groups": min(norm_groups, channels)}), spatial_dims, channels)
    return get_norm_layer("batch", spatial_dims, channels)


class ConvNormAct(nn.Sequential):
    """Convolution -> normalisation -> (dropout) -> activation, the nnU-Net ordering.

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: channel counts.
        kernel_size, stride: per spatial axis.
        padding: ``"same"`` or ``"valid"``.
        norm: one of :data:`NORMS`; ``norm_groups`` is used by ``"group"``.
        act: a MONAI activation name or ``(name, kwargs)``; ``None`` for no activation.
        dropout: channel dropout probability (0 disables).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int],
        *,
        padding: str,
        norm: str,
        act: str | tuple | None,
        dropout: float = 0.0,
        norm_groups: int = 8,
    ):
        conv = Conv[Conv.CONV, spatial_dims](
            in_channels,
            out_channels,
            kernel_size=tuple(kernel_size),
            stride=tuple(stride),
            padding=conv_padding(kernel_size, padding),
            bias=norm == "none",
        )
        layers: list[nn.Module] = [conv, _norm(norm, spatial_dims, out_channels, norm_groups)]
        if dropout > 0:
            layers.append(Dropout[Dropout.DROPOUT, spatial_dims](dropout))
        if act is not None:
            layers.append(get_act_layer(act))
        super().__init__(*layers)


class ConvStage(nn.Sequential):
    """``num_convs`` ConvNormAct layers; the first carries the stage's stride (strided-conv downsampling).

    Args:
        spatial_dims, in_channels, out_channels, kernel_size, stride, padding, norm, act, dropout, norm_groups:
            as for :class:`ConvNormAct`.
        num_convs: convolutions in the stage (>= 1).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int],
        num_convs: int,
        *,
        padding: str,
        norm: str,
        act: str | tuple,
        dropout: float = 0.0,
        norm_groups: int = 8,
    ):
        ones = tuple(1 for _ in kernel_size)
        layers = [
            ConvNormAct(
                spatial_dims,
                in_channels if i == 0 else out_channels,
                out_channels,
                kernel_size,
                stride if i == 0 else ones,
                padding=padding,
                norm=norm,
                act=act,
                dropout=dropout,
                norm_groups=norm_groups,
            )
            for i in range(num_convs)
        ]
        super().__init__(*layers)


class ResidualStage(nn.Module):
    """ResU-Net stage: ConvNormAct layers whose last activation follows the addition of a shortcut.

    The shortcut is the identity, or a 1x1 strided convolution + norm when channels or stride change; in
    ``"valid"`` mode it is centre-cropped to the main path's size.

    Args: as for :class:`ConvStage`.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int],
        num_convs: int,
        *,
        padding: str,
        norm: str,
        act: str | tuple,
        dropout: float = 0.0,
        norm_groups: int = 8,
    ):
        super().__init__()
        ones = tuple(1 for _ in kernel_size)
        layers = []
        for i in range(num_convs):
            last = i == num_convs - 1
            layers.append(
                ConvNormAct(
                    spatial_dims,
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    kernel_size,
                    stride if i == 0 else ones,
                    padding=padding,
                    norm=norm,
                    act=None if last else act,
                    dropout=dropout,
                    norm_groups=norm_groups,
                )
            )
        self.body = nn.Sequential(*layers)
        if in_channels != out_channels or any(s != 1 for s in stride):
            self.shortcut: nn.Module = nn.Sequential(
                Conv[Conv.CONV, spatial_dims](
                    in_channels, out_channels, kernel_size=1, stride=tuple(stride), bias=norm == "none"
                ),
                _norm(norm, spatial_dims, out_channels, norm_groups),
            )
        else:
            self.shortcut = nn.Identity()
        self.act = get_act_layer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return self.act(out + center_crop(self.shortcut(x), out.shape[2:]))


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018) on a skip connection.

    ``alpha = sigmoid(psi(relu(W_x x + W_g g)))`` and the gated skip is ``x * alpha``; ``g`` is the decoder's
    upsampled feature at the skip's resolution.

    Args:
        spatial_dims: 2 or 3.
        skip_channels: channels of the skip ``x``.
        gate_channels: channels of the gating signal ``g``.
        inter_channels: channels of the intermediate projection.
    """

    def __init__(self, spatial_dims: int, skip_channels: int, gate_channels: int, inter_channels: int):
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.w_x = conv(skip_channels, inter_channels, kernel_size=1, bias=False)
        self.w_g = conv(gate_channels, inter_channels, kernel_size=1, bias=True)
        self.psi = conv(inter_channels, 1, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the gated skip and the gate map ``alpha`` (B, 1, *spatial) in [0, 1]."""
        alpha = torch.sigmoid(self.psi(torch.relu(self.w_x(x) + self.w_g(g))))
        return x * alpha, alpha


class Downsample(nn.Module):
    """Max or average pooling with kernel = stride (the classic U-Net's 2x2 max pooling)."""

    def __init__(self, spatial_dims: int, stride: Sequence[int], mode: str):
        super().__init__()
        pool_type = Pool.MAX if mode == "max" else Pool.AVG
        self.pool = Pool[pool_type, spatial_dims](kernel_size=tuple(stride), stride=tuple(stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)


class Upsample(nn.Module):
    """Upsampling by ``stride``: transposed convolution (kernel = stride), or interpolation + 1x1 convolution.

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: channel counts.
        stride: upsampling factor per axis.
        mode: ``"transpose"`` or ``"interp"`` (linear/bilinear/trilinear interpolation).
        bias: whether the convolution has a bias (only useful without normalisation).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        stride: Sequence[int],
        mode: str,
        bias: bool = False,
    ):
        super().__init__()
        self.mode = mode
        self.stride = tuple(float(s) for s in stride)
        if mode == "transpose":
            self.conv = Conv[Conv.CONVTRANS, spatial_dims](
                in_channels, out_channels, kernel_size=tuple(stride), stride=tuple(stride), bias=bias
            )
        else:
            self.conv = Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size=1, bias=bias)
        self._interp = ("linear", "bilinear", "trilinear")[spatial_dims - 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "transpose":
            return self.conv(x)
        # 1x1 convolution first (fewer channels to interpolate when it reduces them: the usual case).
        x = self.conv(x)
        return nn.functional.interpolate(x, scale_factor=self.stride, mode=self._interp, align_corners=False)
