"""The registered U-Net family: the generic ``unet`` and named presets (each a set of UNet defaults).

Every preset accepts any :class:`~medseg.networks.unet.UNet` option to override its defaults, and its
``{name, kwargs}`` spec stores only what the caller passed, so a rebuilt network is identical.
"""

from __future__ import annotations

from typing import Any

from medseg.networks.registry import register_model
from medseg.networks.unet import UNet

__all__ = ["unet", "classic_unet", "unet3d", "attention_unet", "res_unet"]


_SHAPE_KEYS = ("features", "strides", "kernel_sizes", "n_stages")


def _build(defaults: dict[str, Any], spatial_dims: int, in_channels: int, out_channels: int, kwargs) -> UNet:
    if any(k in kwargs for k in _SHAPE_KEYS):
        # The caller shapes the network: drop the preset's per-stage lists so their lengths cannot clash.
        defaults = {k: v for k, v in defaults.items() if not (k in _SHAPE_KEYS and isinstance(v, list))}
    options = {**defaults, **kwargs}
    return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **options)


@register_model("unet", options_from=UNet)
def unet(*, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> UNet:
    """nnU-Net-like U-Net: instance norm, LeakyReLU(0.01), strided-conv downsampling, 2 convs per stage.

    The planner passes ``features``, ``strides`` and ``kernel_sizes`` per stage (anisotropic allowed) and
    ``deep_supervision=True``. See :class:`UNet` for every option.
    """
    return _build({}, spatial_dims, in_channels, out_channels, kwargs)


@register_model("classic_unet", spatial_dims=(2,), options_from=UNet)
def classic_unet(*, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> UNet:
    """The 2015 U-Net (Ronneberger et al.): 64 -> 1024 features, 4 max-poolings, valid 3x3 convs, ReLU.

    No normalisation, 2x2 up-convolutions, centre-cropped skips: a 572x572 input gives a 388x388 output.
    """
    defaults = {
        "features": [64, 128, 256, 512, 1024],
        "strides": [1, 2, 2, 2, 2],
        "kernel_sizes": 3,
        "norm": "none",
        "act": "relu",
        "pooling": "max",
        "upsample": "transpose",
        "padding": "valid",
    }
    return _build(defaults, spatial_dims, in_channels, out_channels, kwargs)


@register_model("unet3d", spatial_dims=(3,), options_from=UNet)
def unet3d(*, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> UNet:
    """3D U-Net (Cicek et al. 2016) layout: 3 max-poolings, batch norm, ReLU, 2x2x2 up-convolutions.

    Padded convolutions by default (pass ``padding="valid"`` for the paper's unpadded ones).
    """
    defaults = {
        "features": [32, 64, 128, 256],
        "strides": [1, 2, 2, 2],
        "norm": "batch",
        "act": "relu",
        "pooling": "max",
        "upsample": "transpose",
    }
    return _build(defaults, spatial_dims, in_channels, out_channels, kwargs)


@register_model("attention_unet", options_from=UNet)
def attention_unet(*, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> UNet:
    """Attention U-Net (Oktay et al. 2018): additive attention gates on every skip connection.

    ``model.forward_with_attention(x)`` returns the logits and the gate maps for visualisation.
    """
    defaults = {"attention": True}
    return _build(defaults, spatial_dims, in_channels, out_channels, kwargs)


@register_model("res_unet", options_from=UNet)
def res_unet(*, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> UNet:
    """Residual U-Net: every stage's convolutions wrapped by a shortcut (identity or strided 1x1 conv)."""
    defaults = {"residual": True}
    return _build(defaults, spatial_dims, in_channels, out_channels, kwargs)
