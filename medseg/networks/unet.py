"""One dimension-generic U-Net covering the variants people ask for.

Stages, features, kernel sizes and strides are given per resolution level (the first level usually has
stride 1), anisotropic where the plan says so. Switches: ``padding="valid"`` (the 2015 paper's unpadded
convolutions with centre-cropped skips, plus :meth:`UNet.output_shape` / :meth:`UNet.input_shape_for` for
overlap-tile inference), ``residual`` (ResU-Net stages), ``attention`` (Attention U-Net gates on the skips) and
``deep_supervision`` (extra heads at lower resolutions, returned in training mode only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv
from torch import nn

from medseg.errors import ConfigError
from medseg.networks.blocks import (
    NORMS,
    AttentionGate,
    ConvStage,
    Downsample,
    ResidualStage,
    Upsample,
    center_crop,
)

__all__ = ["UNet"]

_ACT_DEFAULT_KWARGS = {
    "leakyrelu": {"negative_slope": 0.01, "inplace": True},
    "relu": {"inplace": True},
}


def _per_axis(name: str, value: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * spatial_dims
    out = tuple(int(v) for v in value)
    if len(out) != spatial_dims:
        raise ConfigError(name, list(value), f"an int or a list of {spatial_dims} ints (one per spatial axis)")
    return out


def _per_stage(name: str, value, n_stages: int, spatial_dims: int) -> list[tuple[int, ...]]:
    if isinstance(value, int):
        return [(value,) * spatial_dims] * n_stages
    value = list(value)
    if len(value) != n_stages:
        raise ConfigError(name, value, f"one entry per stage ({n_stages} stages)")
    return [_per_axis(f"{name}[{i}]", v, spatial_dims) for i, v in enumerate(value)]


def _resolve_act(act: str | Sequence) -> tuple[str, dict]:
    if isinstance(act, str):
        name = act.lower()
        return (name, dict(_ACT_DEFAULT_KWARGS.get(name, {})))
    if isinstance(act, Sequence) and len(act) == 2 and isinstance(act[0], str) and isinstance(act[1], dict):
        return (act[0].lower(), dict(act[1]))
    raise ConfigError("act", act, 'an activation name such as "leakyrelu" or [name, {kwargs}]')


class UNet(nn.Module):
    """Dimension-generic U-Net.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes, logits).
        features: channels per stage, highest resolution first; default ``base_features * 2**i`` capped at
            ``max_features`` (320 in 3D, 512 in 2D, as nnU-Net) for ``n_stages`` stages.
        strides: per stage, an int or one int per axis (first stage usually 1); default 1 then 2s.
        kernel_sizes: per stage, an int or one int per axis; default 3.
        n_stages: number of resolution stages when neither ``features`` nor ``strides`` give it (default 5).
        base_features, max_features: the default feature growth (x2 per stage) and its cap.
        convs_per_stage: convolutions per encoder stage (int or one per stage).
        decoder_convs: convolutions per decoder stage (int or one per decoder stage, highest resolution
            first); defaults to ``convs_per_stage``.
        norm: ``"instance"``, ``"batch"``, ``"group"`` (``norm_groups`` groups) or ``"none"``.
        act: a MONAI activation name (``"leakyrelu"`` has slope 0.01, as nnU-Net) or ``[name, {kwargs}]``.
        dropout: channel-dropout probability after each normalisation.
        pooling: ``"conv"`` (strided first convolution, nnU-Net), ``"max"`` or ``"avg"`` pooling.
        upsample: ``"transpose"`` (transposed convolution) or ``"interp"`` (interpolation + 1x1 conv).
        padding: ``"same"`` or ``"valid"`` (unpadded convolutions, centre-cropped skips).
        residual: ResU-Net stages (shortcut around each stage's convolutions).
        attention: attention gates on the skip connections.
        deep_supervision: in training mode return ``[full, 1/2, 1/4, ...]`` logits from every decoder stage.

    Raises:
        ConfigError: on inconsistent or unknown options.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features: Sequence[int] | None = None,
        strides: Sequence | None = None,
        kernel_sizes: Sequence | int | None = None,
        n_stages: int | None = None,
        base_features: int = 32,
        max_features: int | None = None,
        convs_per_stage: int | Sequence[int] = 2,
        decoder_convs: int | Sequence[int] | None = None,
        norm: str = "instance",
        norm_groups: int = 8,
        act: str | Sequence = "leakyrelu",
        dropout: float = 0.0,
        pooling: str = "conv",
        upsample: str = "transpose",
        padding: str = "same",
        residual: bool = False,
        attention: bool = False,
        deep_supervision: bool = False,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ConfigError("spatial_dims", spatial_dims, "2 or 3")
        for name, value, valid in (
            ("norm", norm, NORMS),
            ("pooling", pooling, ("conv", "max", "avg")),
            ("upsample", upsample, ("transpose", "interp")),
            ("padding", padding, ("same", "valid")),
        ):
            if value not in valid:
                raise ConfigError(name, value, "one of " + ", ".join(repr(v) for v in valid))
        if not 0.0 <= dropout < 1.0:
            raise ConfigError("dropout", dropout, "a probability in [0, 1)")
        if in_channels < 1 or out_channels < 1:
            raise ConfigError("in_channels/out_channels", (in_channels, out_channels), "positive channel counts")

        if features is not None:
            n = len(features)
        elif strides is not None:
            n = len(strides)
        elif kernel_sizes is not None and not isinstance(kernel_sizes, int):
            n = len(kernel_sizes)
        else:
            n = n_stages or 5
        if n < 2:
            raise ConfigError("features", features, "at least 2 stages")
        if features is None:
            cap = max_features or (320 if spatial_dims == 3 else 512)
            features = [min(base_features * 2**i, cap) for i in range(n)]
        features = [int(f) for f in features]
        if len(features) != n or min(features) < 1:
            raise ConfigError("features", features, f"{n} positive channel counts (one per stage)")
        strides_t = _per_stage("strides", strides if strides is not None else [1] + [2] * (n - 1), n, spatial_dims)
        kernels_t = _per_stage("kernel_sizes", 3 if kernel_sizes is None else kernel_sizes, n, spatial_dims)
        if any(k % 2 == 0 for ks in kernels_t for k in ks):
            raise ConfigError("kernel_sizes", kernel_sizes, "odd kernel sizes")
        enc_convs = [convs_per_stage] * n if isinstance(convs_per_stage, int) else list(convs_per_stage)
        dec_src = convs_per_stage if decoder_convs is None else decoder_convs
        dec_convs = [dec_src] * (n - 1) if isinstance(dec_src, int) else list(dec_src)[: n - 1]
        if len(enc_convs) != n or len(dec_convs) != n - 1 or min(enc_convs + dec_convs) < 1:
            raise ConfigError("convs_per_stage/decoder_convs", (convs_per_stage, decoder_convs),
                              f"positive counts, {n} for the encoder and {n - 1} for the decoder")

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.features = features
        self.strides = strides_t
        self.kernel_sizes = kernels_t
        self.enc_convs = enc_convs
        self.dec_convs = dec_convs
        self.pooling = pooling
        self.upsample_mode = upsample
        self.padding = padding
        self.deep_supervision = deep_supervision
        self.attention = attention
        act_t = _resolve_act(act)
        stage_cls = ResidualStage if residual else ConvStage
        common = {"padding": padding, "norm": norm, "act": act_t, "dropout": dropout, "norm_groups": norm_groups}
        ones = (1,) * spatial_dims

        encoder = []
        prev = in_channels
        for i in range(n):
            stride = strides_t[i]
            if pooling == "conv":
                encoder.append(stage_cls(spatial_dims, prev, features[i], kernels_t[i], stride, enc_convs[i], **common))
            else:
                stage = stage_cls(spatial_dims, prev, features[i], kernels_t[i], ones, enc_convs[i], **common)
                if any(s > 1 for s in stride):
                    stage = nn.Sequential(Downsample(spatial_dims, stride, pooling), stage)
                encoder.append(stage)
            prev = features[i]
        self.encoder = nn.ModuleList(encoder)

        # decoder[j] brings level j+1 up to level j (kept in resolution order: index 0 is the finest).
        self.upsamplers = nn.ModuleList(
            Upsample(spatial_dims, features[j + 1], features[j], strides_t[j + 1], upsample, bias=norm == "none")
            for j in range(n - 1)
        )
        self.gates = nn.ModuleList(
            AttentionGate(spatial_dims, features[j], features[j], max(features[j] // 2, 1)) for j in range(n - 1)
        ) if attention else None
        self.decoder = nn.ModuleList(
            stage_cls(spatial_dims, 2 * features[j], features[j], kernels_t[j], ones, dec_convs[j], **common)
            for j in range(n - 1)
        )
        n_heads = n - 1 if deep_supervision else 1
        self.heads = nn.ModuleList(
            Conv[Conv.CONV, spatial_dims](features[j], out_channels, kernel_size=1, bias=True) for j in range(n_heads)
        )
        negative_slope = act_t[1].get("negative_slope", 0.0) if act_t[0] == "leakyrelu" else 0.0
        self._init_weights(negative_slope)

    def _init_weights(self, negative_slope: float) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(module.weight, a=negative_slope)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def deep_supervision_scales(self) -> list[tuple[int, ...]]:
        """Downsampling factor per axis of each training-mode output, ``[(1, 1, 1), (1, 2, 2), ...]``."""
        scales, current = [], [1] * self.spatial_dims
        for j in range(len(self.heads)):
            current = [c * s for c, s in zip(current, self.strides[j])]
            scales.append(tuple(current))
        return scales

    def _run(self, x: torch.Tensor, keep_maps: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        want_all = self.deep_supervision and self.training
        outputs: list[torch.Tensor] = []
        maps: list[torch.Tensor] = []
        for j in range(len(self.decoder) - 1, -1, -1):
            skip = skips[j]
            x = self.upsamplers[j](x)
            shape = [min(a, b) for a, b in zip(x.shape[2:], skip.shape[2:])]
            x, skip = center_crop(x, shape), center_crop(skip, shape)
            if self.gates is not None:
                skip, alpha = self.gates[j](skip, x)
                if keep_maps:
                    maps.append(alpha)
            x = self.decoder[j](torch.cat((skip, x), dim=1))
            if want_all:
                outputs.append(self.heads[j](x))
            elif j == 0:
                outputs.append(self.heads[0](x))
        outputs.reverse()
        maps.reverse()
        return outputs, maps

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits ``(B, K, *spatial)``; a list ``[full, 1/2, ...]`` in training mode with deep supervision."""
        outputs, _ = self._run(x, keep_maps=False)
        if self.deep_supervision and self.training:
            return outputs
        return outputs[0]

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Full-resolution logits and the attention gate maps, finest first (each ``(B, 1, *level_shape)``).

        Raises:
            ConfigError: when the network was built without ``attention=True``.
        """
        if self.gates is None:
            raise ConfigError("attention", False, "True to return attention maps")
        outputs, maps = self._run(x, keep_maps=True)
        return outputs[0], maps

    # ---- shape arithmetic (exact simulation of the layers; used for valid-padding overlap-tile inference) ----
    def _axis_output(self, size: int, axis: int) -> int:
        def convs(n: int, k: int, count: int) -> int:
            return n if self.padding == "same" else n - count * (k - 1)

        sizes = []
        n = size
        for i in range(len(self.features)):
            k, s = self.kernel_sizes[i][axis], self.strides[i][axis]
            if self.pooling == "conv":
                pad = (k - 1) // 2 if self.padding == "same" else 0
                n = (n + 2 * pad - k) // s + 1
                n = convs(n, k, self.enc_convs[i] - 1)
            else:
                n = n // s if s > 1 else n
                n = convs(n, k, self.enc_convs[i])
            if n < 1:
                return 0
            sizes.append(n)
        n = sizes.pop()
        for j in range(len(self.decoder) - 1, -1, -1):
            s = self.strides[j + 1][axis]
            n = n * s if self.upsample_mode == "transpose" else math.floor(n * float(s))
            n = min(n, sizes[j])
            n = convs(n, self.kernel_sizes[j][axis], self.dec_convs[j])
            if n < 1:
                return 0
        return n

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial output shape for a spatial input shape (equal to it with ``padding="same"``).

        Args:
            input_shape: spatial input shape.

        Returns:
            The spatial shape of the logits.

        Raises:
            ConfigError: when the input is too small for the network (some feature map would vanish).
        """
        if len(input_shape) != self.spatial_dims:
            raise ConfigError("input_shape", list(input_shape), f"{self.spatial_dims} spatial sizes")
        out = tuple(self._axis_output(int(n), a) for a, n in enumerate(input_shape))
        if min(out) < 1:
            raise ConfigError("input_shape", list(input_shape), "a larger input: a feature map would be empty")
        return out

    def input_shape_for(self, output_shape: Sequence[int]) -> tuple[int, ...]:
        """Smallest spatial input whose output covers ``output_shape`` (overlap-tile inference).

        With valid padding the output is the centre of the input, ``(input - output) / 2`` from each side.

        Args:
            output_shape: wanted spatial output shape.

        Returns:
            The spatial input shape.
        """
        if len(output_shape) != self.spatial_dims:
            raise ConfigError("output_shape", list(output_shape), f"{self.spatial_dims} spatial sizes")
        result = []
        for axis, target in enumerate(output_shape):
            n = int(target)
            while self._axis_output(n, axis) < target:
                n += 1
            result.append(n)
        return tuple(result)
