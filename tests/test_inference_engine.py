"""The sliding-window engine against a naive float64 reference (independent padding, weighting and averaging)."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch
from torch import nn

from medseg.inference.sliding_window import (
    gaussian_1d,
    mirror_indices,
    sliding_window_predict,
    sliding_window_predict_slices,
    window_starts,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _net(nd: int, cin: int, k: int, *, valid: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    conv = nn.Conv3d if nd == 3 else nn.Conv2d
    pad = 0 if valid else 1
    net = nn.Sequential(conv(cin, 4, 3, padding=pad), nn.Tanh(), conv(4, k, 3, padding=pad))
    return net.eval()


def _reference(net, image, patch, overlap, mirror_axes=(), crop=0, activation=None) -> np.ndarray:
    """Naive float64 overlap-tile: np.pad(reflect) of the whole image, full-size Gaussian and weight maps."""
    net64 = _clone64(net)
    img = np.asarray(image, dtype=np.float64)
    nd = img.ndim - 1
    spatial = img.shape[1:]
    crop = (crop,) * nd if isinstance(crop, int) else crop
    tile = [p - 2 * c for p, c in zip(patch, crop)]
    lo = [max(t - s, 0) // 2 for s, t in zip(spatial, tile)]
    ext = [max(s, t) for s, t in zip(spatial, tile)]
    pads = [(0, 0)] + [(lo_ + c, e - s - lo_ + c) for lo_, c, e, s in zip(lo, crop, ext, spatial)]
    padded = np.pad(img, pads, mode="reflect")
    # full Gaussian written out directly (not as a product of 1D factors)
    grids = np.meshgrid(*[np.arange(t) - (t - 1) / 2 for t in tile], indexing="ij")
    g = np.exp(-0.5 * sum((x / (t / 8)) ** 2 for x, t in zip(grids, tile)))
    acc, wsum = None, np.zeros(ext)
    for pos in itertools.product(*[window_starts(s, t, overlap) for s, t in zip(spatial, tile)]):
        sl = tuple(slice(a, a + p) for a, p in zip(pos, patch))
        x = torch.from_numpy(padded[(slice(None), *sl)][None].copy())
        outs = []
        for r in range(len(mirror_axes) + 1):
            for flip in itertools.combinations([a + 2 for a in mirror_axes], r):
                with torch.no_grad():
                    y = net64(torch.flip(x, flip) if flip else x)
                if activation == "softmax":
                    y = torch.softmax(y, 1)
                outs.append((torch.flip(y, flip) if flip else y)[0].numpy())
        y = np.mean(outs, axis=0)
        if acc is None:
            acc = np.zeros((y.shape[0], *ext))
        osl = tuple(slice(a, a + t) for a, t in zip(pos, tile))
        acc[(slice(None), *osl)] += y * g
        wsum[osl] += g
    res = acc / wsum
    return res[(slice(None), *[slice(lo_, lo_ + s) for lo_, s in zip(lo, spatial)])]


def _clone64(net: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(net).double()


CASES = [
    # nd, image shape (C, *spatial), patch, overlap, mirror axes, valid crop, batch size
    pytest.param(3, (2, 13, 17, 9), (8, 8, 8), 0.5, (0, 2), 0, 3, id="3d-nondivisible-mirror-batched"),
    pytest.param(3, (1, 5, 20, 3), (8, 8, 8), 0.5, (), 0, 2, id="3d-smaller-than-patch"),
    pytest.param(2, (1, 2, 30), (8, 8), 0.25, (1,), 0, 4, id="2d-much-smaller-than-patch"),
    pytest.param(2, (3, 23, 19), (10, 6), 0.0, (0, 1), 0, 1, id="2d-no-overlap"),
    pytest.param(2, (1, 1, 12), (4, 4), 0.75, (), 0, 5, id="2d-size-one-axis"),
    pytest.param(3, (1, 14, 11, 10), (12, 12, 12), 0.5, (1,), 2, 2, id="3d-valid-conv-input-gt-output"),
    pytest.param(2, (2, 25, 9), (10, 10), 0.5, (0,), 2, 3, id="2d-valid-conv-smaller-than-tile"),
]


@pytest.mark.parametrize("nd, shape, patch, overlap, mirror, crop, bs", CASES)
@pytest.mark.parametrize("activation", [None, "softmax"])
def test_engine_equals_float64_reference(nd, shape, patch, overlap, mirror, crop, bs, activation):
    rng = np.random.default_rng(sum(shape))
    image = rng.normal(size=shape).astype(np.float32)
    before = image.copy()
    net = _net(nd, shape[0], 3, valid=crop > 0, seed=len(shape) + crop)
    out = sliding_window_predict(net, torch.from_numpy(image), patch_size=patch, overlap=overlap,
                                 mirror_axes=mirror, batch_size=bs, valid_crop=crop or None, activation=activation)
    ref = _reference(net, image, patch, overlap, mirror, crop, activation)
    assert out.dtype == torch.float32
    assert tuple(out.shape) == (3, *shape[1:])
    np.testing.assert_allclose(out.numpy(), ref, atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(image, before)  # the input is never modified


def test_window_starts_cover_and_respect_step():
    for size, tile, overlap in [(100, 16, 0.5), (17, 8, 0.25), (8, 8, 0.5), (3, 8, 0.5), (1000, 128, 0.0)]:
        st = window_starts(size, tile, overlap)
        assert st[0] == 0 and st[-1] == max(size, tile) - tile
        steps = np.diff(st)
        assert np.all(steps <= tile * (1 - overlap) + 1) and np.all(steps >= 1)


def test_mirror_indices_match_numpy_reflect():
    for size in (1, 2, 5):
        a = np.arange(size)
        for lo, hi in [(3, 4), (11, 2), (0, 9)]:
            expected = np.pad(a, (lo, hi), mode="reflect") if size > 1 else np.pad(a, (lo, hi), mode="edge")
            np.testing.assert_array_equal(mirror_indices(-lo, size + hi, size), expected)


def test_gaussian_sigma_is_one_eighth_of_tile():
    g = gaussian_1d(64)
    x = np.arange(64) - 31.5
    np.testing.assert_allclose(g, np.exp(-0.5 * (x / 8.0) ** 2) / np.exp(-0.5 * (0.5 / 8.0) ** 2))


def test_slicewise_equals_per_slice_2d():
    rng = np.random.default_rng(3)
    image = torch.from_numpy(rng.normal(size=(1, 9, 4, 11)).astype(np.float32))
    net = _net(2, 1, 2)
    out = sliding_window_predict_slices(net, image, slice_axis=1, patch_size=(8, 8), batch_size=5, mirror_axes=(0,))
    assert tuple(out.shape) == (2, 9, 4, 11)
    for k in range(4):
        ref = sliding_window_predict(net, image[:, :, k], patch_size=(8, 8), mirror_axes=(0,))
        np.testing.assert_allclose(out[:, :, k].numpy(), ref.numpy(), atol=1e-6)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_bf16_on_cpu_within_0002_dice_of_fp32():
    zz, yy, xx = np.mgrid[:40, :36, :30]
    sphere = ((zz - 20) ** 2 + (yy - 17) ** 2 + (xx - 14) ** 2) < 11**2
    rng = np.random.default_rng(0)
    image = torch.from_numpy((sphere * 2.0 + rng.normal(0, 0.3, sphere.shape)).astype(np.float32)[None])
    net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1)).eval()
    with torch.no_grad():  # a "trained" voxel classifier: smoothed intensity against a threshold of 1
        net[0].weight.zero_()
        net[0].weight[1] += 1 / 27
        net[0].bias.copy_(torch.tensor([0.0, -1.0]))
    kw = dict(patch_size=(16, 16, 16), batch_size=4, mirror_axes=(0, 1, 2), activation="softmax")
    p32 = sliding_window_predict(net, image, **kw).argmax(0).numpy()
    p16 = sliding_window_predict(net, image, amp_dtype=torch.bfloat16, **kw).argmax(0).numpy()
    assert _dice(p32 == 1, sphere) > 0.95
    assert abs(_dice(p16 == 1, sphere) - _dice(p32 == 1, sphere)) <= 0.002
    assert _dice(p16 == 1, p32 == 1) >= 0.998


class _OOMWhenBatched(nn.Module):
    """Raises the CUDA out-of-memory error for batches larger than one window."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(x)


def test_out_of_memory_falls_back_and_logs(caplog):
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.normal(size=(1, 12, 10, 9)).astype(np.float32))
    inner = _net(3, 1, 2)
    with caplog.at_level(logging.WARNING, logger="medseg.inference"):
        out = sliding_window_predict(_OOMWhenBatched(inner), image, patch_size=(8, 8, 8), batch_size=4)
    assert any("out of memory" in r.getMessage() for r in caplog.records)
    ref = sliding_window_predict(inner, image, patch_size=(8, 8, 8), batch_size=1)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-6)


def test_wrong_output_tile_is_explained():
    net = _net(3, 1, 2, valid=True)
    with pytest.raises(ValueError, match="valid_crop"):
        sliding_window_predict(net, torch.zeros(1, 10, 10, 10), patch_size=(8, 8, 8))


def test_compiled_network_runs_the_compiled_shape_compiled_and_other_batches_eager():
    from medseg.inference.compiled import CompiledNetwork

    class Probe(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, x):
            return (x * self.k, x)  # deep-supervision style tuple: the first output is the prediction

    net = CompiledNetwork(Probe(2), Probe(3), (4, 1, 4, 4))
    full, part = torch.randn(4, 1, 4, 4), torch.randn(3, 1, 4, 4)
    assert torch.equal(net(full), full * 2)  # the compiled graph's shape
    assert torch.equal(net(part), part * 3)  # a smaller last batch: the eager network, no recompilation


def test_compile_failure_falls_back_to_the_eager_network_and_logs(monkeypatch, caplog):
    from medseg.inference import compiled

    def broken(*_a, **_k):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    net = _net(2, 1, 2)
    with caplog.at_level(logging.WARNING, logger="medseg.inference.compiled"):
        out = compiled.compile_for_inference(net, (2, 1, 8, 8), torch.device("cpu"))
    assert out is net
    assert "torch.compile failed (RuntimeError: no C++ compiler found)" in caplog.text


@pytest.mark.skipif(not __import__("shutil").which("g++"), reason="torch.compile on a CPU needs a C++ compiler (g++)")
def test_compiled_engine_equals_eager_on_every_window_batch():
    """Compiled for (5, C, *patch), it serves the last, smaller batch too (its own graph) and equals eager."""
    from medseg.inference.compiled import CompiledNetwork, compile_for_inference

    net = _net(3, 1, 3)
    image = torch.randn(1, 20, 18, 13)
    # 4 x 4 x 3 = 48 windows in batches of 5: the last batch has 3
    kw = {"patch_size": (8, 8, 8), "overlap": 0.5, "batch_size": 5, "mirror_axes": (0,), "activation": "softmax"}
    eager = sliding_window_predict(net, image, **kw)
    compiled = compile_for_inference(net, (5, 1, 8, 8, 8), torch.device("cpu"))
    assert isinstance(compiled, CompiledNetwork)
    out = sliding_window_predict(compiled, image, **kw)
    assert out.shape == eager.shape and torch.allclose(out, eager, atol=1e-5)
