"""Synthetic data and a tiny network for the trainer tests (no planning, loader or network modules needed)."""

from __future__ import annotations

import numpy as np
import torch

from medseg.training.trainer import ValCase


def blob_case(seed: int, shape=(16, 16, 16)):
    """A noisy image with a bright sphere (label 1) and a darker cube (label 2)."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int16)
    c = rng.integers(5, 11, size=3)
    zz, yy, xx = np.indices(shape)
    lab[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 9] = 1
    o = rng.integers(1, 4, size=3)
    lab[o[0]:o[0] + 3, o[1]:o[1] + 3, o[2]:o[2] + 3] = 2
    img = lab.astype(np.float32) + rng.normal(0, 0.3, shape).astype(np.float32)
    return img[None], lab[None]


def batches_fn(n_cases=6, batch=2, per_epoch=3, seed=0):
    cases = [blob_case(seed + i) for i in range(n_cases)]

    def batches(epoch: int):
        rng = np.random.default_rng([seed, epoch])
        for _ in range(per_epoch):
            idx = rng.integers(0, n_cases, size=batch)
            yield {"image": torch.from_numpy(np.stack([cases[i][0] for i in idx])),
                   "label": torch.from_numpy(np.stack([cases[i][1] for i in idx]).astype(np.int64))}

    return batches


def val_cases(n=2, seed=100):
    return [ValCase(f"v{i}", *blob_case(seed + i)) for i in range(n)]


def tiny_net(seed: int = 0):
    """A two-stage medseg U-Net (3 classes) and its spec, built by the registry as training builds networks."""
    from medseg.networks import create_model, model_spec

    torch.manual_seed(seed)
    net = create_model("unet", spatial_dims=3, in_channels=1, out_channels=3, features=[4, 8], strides=[1, 2],
                       deep_supervision=False)
    return net, model_spec(net)


def loss_and_grad(loss, logits, target):
    """``(loss value, gradient at the logits)`` of one loss call (the ignore-label and region checks)."""
    x = logits.clone().requires_grad_(True)
    value = loss(x, target)
    value.backward()
    return value.detach(), x.grad


def check_ignored_logits_change_nothing(loss, logits, target, ignored):
    """Set the logits at ignored voxels to wild values and assert, bitwise, that neither the loss nor its gradient
    at the other logits changes and that the gradient at ignored voxels is zero; returns the changed logits (for
    the caller's control, which must see a change)."""
    m = ignored.expand_as(logits)
    other = logits.clone()
    other[m] = torch.randn(int(m.sum()), generator=torch.Generator().manual_seed(5)) * 1e3
    v1, g1 = loss_and_grad(loss, logits, target)
    v2, g2 = loss_and_grad(loss, other, target)
    assert torch.isfinite(v1) and v1 > 0
    assert torch.equal(v1, v2)
    assert torch.equal(g1[~m], g2[~m])
    assert torch.count_nonzero(g1[m]) == 0 and torch.count_nonzero(g2[m]) == 0
    return other
