"""MONAI's U-Net++ and Swin-UNETR, registered in the factory and adapted to medseg's forward contract.

``unetpp`` wraps ``monai.networks.nets.BasicUNetPlusPlus`` (spatial sizes of at least 16, best divisible by
16); with ``deep_supervision=True`` in training mode it returns its nested heads, which are all at full
resolution (``deep_supervision_scales`` says so); without it the three unused heads are not built. ``swin_unetr`` wraps ``monai.networks.nets.SwinUNETR`` (spatial sizes
divisible by 32); it has no deep supervision and needs the ``einops`` package.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
from monai.networks.nets import BasicUNetPlusPlus, SwinUNETR
from torch import nn

from medseg.errors import ConfigError
from medseg.networks.contract import SameShape
from medseg.networks.registry import register_model

__all__ = ["UNetPlusPlus", "SwinUNETRNet"]


def _layer_arg(name: str, value: str | Sequence) -> str | tuple:
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], dict):
        return (value[0], dict(value[1]))
    raise ConfigError(name, value, "a layer name or [name, {kwargs}]")


_UNUSED_HEADS = ("final_conv_0_1", "final_conv_0_2", "final_conv_0_3")


def _drop_unused_heads(module, state_dict, prefix, *args) -> None:
    # Checkpoints written before the unused heads were removed still hold their weights: ignore them.
    for key in [k for k in state_dict if k.startswith(tuple(f"{prefix}net.{h}." for h in _UNUSED_HEADS))]:
        del state_dict[key]


class UNetPlusPlus(nn.Module):
    """U-Net++ (Zhou et al. 2018) from MONAI with medseg's forward contract.

    Args:
        spatial_dims, in_channels, out_channels: as for every model.
        features: six channel counts (five levels and the final up-sampling), MONAI's convention.
        deep_supervision: in training mode return the four nested heads, deepest path first.
        act, norm: MONAI layer names or ``[name, {kwargs}]``.
        dropout: dropout probability.
        upsample: ``"deconv"``, ``"pixelshuffle"`` or ``"nontrainable"``.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        deep_supervision: bool = False,
        act: str | Sequence = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        norm: str | Sequence = ("instance", {"affine": True}),
        dropout: float = 0.0,
        upsample: str = "deconv",
    ):
        super().__init__()
        if len(features) != 6:
            raise ConfigError("features", list(features), "six channel counts (MONAI BasicUNetPlusPlus)")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.deep_supervision = deep_supervision
        # Same padding; MONAI pads odd sizes after each 2x pooling, so any size of at least 2**4 works.
        self.output_shape = SameShape(spatial_dims, min_size=16, name="unetpp")
        self.net = BasicUNetPlusPlus(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            features=tuple(features),
            deep_supervision=deep_supervision,
            act=_layer_arg("act", act),
            norm=_layer_arg("norm", norm),
            dropout=dropout,
            upsample=upsample,
        )
        if not deep_supervision:
            # MONAI builds the three nested heads even when it discards their outputs: they would be
            # parameters without gradients (a DDP error, wasted optimizer state). Identity keeps its forward.
            for head in _UNUSED_HEADS:
                setattr(self.net, head, nn.Identity())
            self.register_load_state_dict_pre_hook(_drop_unused_heads)

    @property
    def deep_supervision_scales(self) -> list[tuple[int, ...]]:
        """All nested heads are at full resolution."""
        n = 4 if self.deep_supervision else 1
        return [(1,) * self.spatial_dims] * n

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits ``(B, K, *spatial)``; in training mode with deep supervision the 4 heads, deepest first."""
        outputs = self.net(x)
        if self.deep_supervision and self.training:
            return outputs[::-1]
        return outputs[-1]


class SwinUNETRNet(nn.Module):
    """Swin-UNETR (Hatamizadeh et al. 2022) from MONAI; spatial sizes must be divisible by 32.

    Args:
        spatial_dims, in_channels, out_channels: as for every model.
        feature_size: embedding size, divisible by 12.
        depths, num_heads, window_size: Swin transformer layout.
        drop_rate, attn_drop_rate, dropout_path_rate: dropout probabilities.
        norm: ``"instance"`` or ``"batch"`` (convolutional blocks).
        use_checkpoint: gradient checkpointing (less memory, slower).
        use_v2: Swin-UNETR v2 (residual convolution blocks in the encoder).
        deep_supervision: unsupported; ``True`` raises ConfigError.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        feature_size: int = 24,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        dropout_path_rate: float = 0.0,
        norm: str = "instance",
        use_checkpoint: bool = False,
        use_v2: bool = False,
        deep_supervision: bool = False,
    ):
        super().__init__()
        if importlib.util.find_spec("einops") is None:
            raise ConfigError("network.name", "swin_unetr", "a Python environment with einops installed "
                              "(MONAI's SwinUNETR needs it: pip install einops)")
        if deep_supervision:
            raise ConfigError("deep_supervision", True, "False: swin_unetr has no deep-supervision heads")
        if feature_size % 12:
            raise ConfigError("feature_size", feature_size, "a multiple of 12")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.deep_supervision = False
        # Sizes divisible by 32 (training also needs more than one bottleneck voxel: instance norm).
        self.output_shape = SameShape(spatial_dims, divisor=32, name="swin_unetr")
        self.net = SwinUNETR(
            in_channels=in_channels,
            out_channels=out_channels,
            feature_size=feature_size,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            dropout_path_rate=dropout_path_rate,
            norm_name=norm,
            use_checkpoint=use_checkpoint,
            spatial_dims=spatial_dims,
            use_v2=use_v2,
        )

    @property
    def deep_supervision_scales(self) -> list[tuple[int, ...]]:
        """A single full-resolution output."""
        return [(1,) * self.spatial_dims]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K, *spatial)``."""
        return self.net(x)


@register_model("unetpp", options_from=UNetPlusPlus)
def unetpp(*, spatial_dims: int, in_channels: int, out_channels: int, **kwargs) -> UNetPlusPlus:
    """U-Net++ (nested, dense skip pathways) from MONAI's BasicUNetPlusPlus; sizes divisible by 16."""
    return UNetPlusPlus(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)


@register_model("swin_unetr", options_from=SwinUNETRNet)
def swin_unetr(*, spatial_dims: int, in_channels: int, out_channels: int, **kwargs) -> SwinUNETRNet:
    """Swin-UNETR (Swin transformer encoder, CNN decoder) from MONAI; sizes divisible by 32."""
    return SwinUNETRNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)
