"""Losses: every named loss runs forward/backward in 2D and 3D, decreases under optimisation, and the border
weight map and deep-supervision weights follow their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.errors import ConfigError
from medseg.losses import (
    LOSSES,
    DeepSupervisionLoss,
    build_loss,
    deep_supervision_weights,
    inverse_frequency_weights,
    unet_weight_map,
)


def _target(shape, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, k, (2, 1, *shape), generator=g)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("shape", [(12, 12), (8, 8, 8)])
def test_loss_is_lower_for_the_right_answer(name, shape):
    target = _target(shape, k=2 if name == "border_ce" else 3)
    k = 2 if name == "border_ce" else 3
    loss = build_loss(name, num_classes=k, class_counts=[100, 20, 5][:k])
    perfect = torch.nn.functional.one_hot(target[:, 0], k).movedim(-1, 1).float() * 20 - 10
    wrong = torch.roll(perfect, 1, dims=1)
    good, bad = loss(perfect, target), loss(wrong, target)
    assert good.ndim == 0 and torch.isfinite(good)
    assert float(good) < float(bad)
    logits = torch.zeros((2, k, *shape), requires_grad=True)
    loss(logits, target).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_unknown_loss_suggests_a_name():
    with pytest.raises(ConfigError, match="dice_ce"):
        build_loss("dice_cee", num_classes=3)
    with pytest.raises(ConfigError, match="class voxel counts"):
        build_loss("weighted_ce", num_classes=3)


def test_inverse_frequency_weights():
    w = inverse_frequency_weights([900, 90, 10])
    assert torch.allclose(w.mean(), torch.tensor(1.0))
    assert w[2] / w[1] == pytest.approx(9.0) and w[1] / w[0] == pytest.approx(10.0)
    assert inverse_frequency_weights([10, 0, 10])[1] == 0


def test_deep_supervision_weights_and_target_downsampling():
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    seen = []

    def probe(out, t):
        seen.append(tuple(t.shape))
        return out.float().mean() * 0 + 1.0

    ds = DeepSupervisionLoss(probe)
    target = _target((16, 16))
    outs = [torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 4, 4)]
    assert float(ds(outs, target)) == pytest.approx(1.0)
    assert seen == [(2, 1, 16, 16), (2, 1, 8, 8), (2, 1, 4, 4)]


def test_border_weight_map_peaks_between_touching_cells():
    lab = np.zeros((20, 30), np.int64)
    lab[5:15, 3:14] = 1
    lab[5:15, 16:27] = 1  # two cells separated by a 2-pixel gap (columns 14, 15)
    w = unet_weight_map(lab, w0=10, sigma=5)
    gap, far = w[10, 14], w[0, 0]
    assert gap > far + 5  # d1 + d2 = 1 + 2 -> 10 * exp(-9/50) ~ 8.4 extra weight
    assert w[10, 14] == pytest.approx(w[10, 15], rel=1e-5)
    single = np.zeros((20, 30), np.int64)
    single[5:15, 3:14] = 1
    assert unet_weight_map(single)[10, 14] < gap - 5  # no second instance -> no border term
