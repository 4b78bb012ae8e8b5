"""U-Net topology from patch size and spacing: pooling per axis, strides and kernel sizes (nnU-Net's rules).

An axis is pooled while its feature map stays >= ``2 * min_feature_map_size`` and its current spacing is within a
factor 2 of the finest spacing, so anisotropic data pool in-plane first; kernels are 1 along an axis whose spacing
is still over twice the finest, else 3. The patch is then padded up to a multiple of ``2**pools`` per axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Topology", "pool_and_conv_props"]


@dataclass
class Topology:
    """Result of :func:`pool_and_conv_props`.

    Attributes:
        pools_per_axis: number of 2x poolings per axis.
        strides: per stage, per axis (first stage all 1).
        kernel_sizes: per stage, per axis (3, or 1 along coarse axes).
        patch_size: the patch padded to a multiple of ``divisible_by``.
        divisible_by: ``2**pools_per_axis``.
    """

    pools_per_axis: list[int]
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    patch_size: list[int]
    divisible_by: list[int]


def pool_and_conv_props(
    spacing: list[float], patch_size: list[int], min_feature_map_size: int = 4, max_numpool: int = 5
) -> Topology:
    """Pooling and convolution layout for a patch (nnU-Net's ``get_pool_and_conv_props``).

    Args:
        spacing: voxel spacing of the patch per axis (mm).
        patch_size: requested patch size per axis.
        min_feature_map_size: smallest bottleneck edge length.
        max_numpool: maximum poolings per axis.

    Returns:
        A :class:`Topology`.
    """
    dim = len(spacing)
    cur_spacing = [float(s) for s in spacing]
    cur_size = [int(s) for s in patch_size]
    pools = [0] * dim
    kernel = [1] * dim
    strides: list[list[int]] = [[1] * dim]
    kernels: list[list[int]] = []
    while True:
        valid = [i for i in range(dim) if cur_size[i] >= 2 * min_feature_map_size]
        if not valid:
            break
        min_sp = min(cur_spacing[i] for i in valid)
        valid = [i for i in valid if cur_spacing[i] / min_sp < 2 and pools[i] < max_numpool]
        if len(valid) == 1 and cur_size[valid[0]] < 3 * min_feature_map_size:
            break
        if not valid:
            break
        finest = min(cur_spacing)
        for d in range(dim):
            if kernel[d] != 3 and cur_spacing[d] / finest < 2:
                kernel[d] = 3
        stride = [1] * dim
        for v in valid:
            stride[v] = 2
            pools[v] += 1
            cur_spacing[v] *= 2
            cur_size[v] = math.ceil(cur_size[v] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dim)  # bottleneck
    div = [2**p for p in pools]
    padded = [int(math.ceil(s / d) * d) for s, d in zip(patch_size, div)]
    return Topology(pools, strides, kernels, padded, div)
