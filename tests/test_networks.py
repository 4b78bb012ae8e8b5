"""Tests of medseg.networks: registry, every registered model in 2D/3D, valid padding, specs, AMP, memory."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from medseg.errors import ConfigError
from medseg.networks import (
    UNet,
    build_model,
    count_parameters,
    create_model,
    estimate_memory,
    list_models,
    measure_peak_memory,
    model_spec,
)

torch.set_num_threads(1)

HAS_EINOPS = importlib.util.find_spec("einops") is not None
needs_einops = pytest.mark.skipif(not HAS_EINOPS, reason="swin_unetr needs einops (MONAI optional dependency), not installed")

# Tiny options per registered model (and the input edge each needs: U-Net++ /16, Swin-UNETR /32).
TINY = {
    "unet": ({"features": [4, 8, 16]}, 16),
    "unet3d": ({"features": [4, 8, 16], "strides": [1, 2, 2]}, 16),
    "attention_unet": ({"features": [4, 8, 16]}, 16),
    "res_unet": ({"features": [4, 8, 16]}, 16),
    "classic_unet": ({"features": [4, 8, 16, 32, 64]}, 188),
    "unetpp": ({"features": [4, 4, 8, 8, 16, 4]}, 32),
    "swin_unetr": ({"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]}, 64),
}
CASES = [
    pytest.param(name, dims, id=f"{name}-{dims}d", marks=[needs_einops] if name == "swin_unetr" else [])
    for dims in (2, 3)
    for name in list_models(dims)
]


def test_registry_lists_every_model_and_each_has_a_tiny_case():
    assert set(list_models()) == set(TINY)
    assert "classic_unet" not in list_models(3) and "unet3d" not in list_models(2)


@pytest.mark.parametrize(("name", "dims"), CASES)
def test_every_model_forward_backward(name, dims):
    kwargs, edge = TINY[name]
    torch.manual_seed(0)
    model = create_model(name, spatial_dims=dims, in_channels=2, out_channels=3, **kwargs)
    x = torch.randn(2, 2, *([edge] * dims))
    out = model(x)
    expected = model.output_shape([edge] * dims) if hasattr(model, "output_shape") else (edge,) * dims
    assert tuple(out.shape) == (2, 3, *expected)
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None for g in grads) >= 0.9 * len(grads)
    first = next(p for p in model.parameters() if p.grad is not None)
    assert first.grad.abs().sum() > 0


def test_unknown_name_lists_names_and_suggests():
    with pytest.raises(ConfigError, match=r"did you mean 'unet3d'\?") as err:
        create_model("unet_3d", spatial_dims=3, in_channels=1, out_channels=2)
    assert "swin_unetr" in str(err.value) and "\n" not in str(err.value)


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError, match="did you mean 'features'"):
        create_model("unet", spatial_dims=2, in_channels=1, out_channels=2, feature=[4, 8])
    with pytest.raises(ConfigError, match="spatial_dims"):
        create_model("classic_unet", spatial_dims=3, in_channels=1, out_channels=2)
    with pytest.raises(ConfigError, match="strides"):
        create_model("unet", spatial_dims=3, in_channels=1, out_channels=2, features=[4, 8, 16], strides=[1, 2])
    with pytest.raises(ConfigError, match="kernel_sizes"):
        create_model("unet", spatial_dims=2, in_channels=1, out_channels=2, features=[4, 8], kernel_sizes=2)
    with pytest.raises(ConfigError, match="norm"):
        create_model("unet", spatial_dims=2, in_channels=1, out_channels=2, norm="layer")
    with pytest.raises(ConfigError, match="deep_supervision" if HAS_EINOPS else "einops"):
        create_model("swin_unetr", spatial_dims=2, in_channels=1, out_channels=2, deep_supervision=True)


def test_default_features_grow_and_cap():
    net = create_model("unet", spatial_dims=3, in_channels=1, out_channels=2, n_stages=6)
    assert net.features == [32, 64, 128, 256, 320, 320]
    net2 = create_model("unet", spatial_dims=2, in_channels=1, out_channels=2, n_stages=6, max_features=128)
    assert net2.features == [32, 64, 128, 128, 128, 128]


def test_deep_supervision_anisotropic_resolutions():
    net = create_model(
        "unet", spatial_dims=3, in_channels=1, out_channels=2, features=[4, 8, 16, 16],
        strides=[1, [1, 2, 2], [2, 2, 2], [2, 2, 1]], kernel_sizes=[[1, 3, 3], 3, 3, 3], deep_supervision=True,
    )
    x = torch.randn(1, 1, 8, 16, 12)
    outs = net(x)
    assert [tuple(o.shape[2:]) for o in outs] == [(8, 16, 12), (8, 8, 6), (4, 4, 3)]
    assert net.deep_supervision_scales == [(1, 1, 1), (1, 2, 2), (2, 4, 4)]
    for out, scale in zip(outs, net.deep_supervision_scales):
        assert tuple(out.shape[2:]) == tuple(n // s for n, s in zip(x.shape[2:], scale))
    net.eval()
    with torch.no_grad():
        full = net(x)
    assert isinstance(full, torch.Tensor) and full.shape == (1, 2, 8, 16, 12)


def test_unetpp_deep_supervision_heads_are_full_resolution():
    net = create_model("unetpp", spatial_dims=2, in_channels=1, out_channels=2,
                       features=[4, 4, 8, 8, 16, 4], deep_supervision=True)
    outs = net(torch.randn(1, 1, 32, 32))
    assert len(outs) == 4 and all(o.shape == (1, 2, 32, 32) for o in outs)
    net.eval()
    assert net(torch.randn(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def _paper_unet_parameters(in_ch: int, classes: int) -> int:
    """Parameter count of the 2015 U-Net from its channel sizes (3x3 convs, 2x2 up-convs, biases)."""
    chans = [64, 128, 256, 512, 1024]
    total, prev = 0, in_ch
    for c in chans:
        total += (prev * 9 + 1) * c + (c * 9 + 1) * c
        prev = c
    for c in reversed(chans[:-1]):
        total += (prev * 4 + 1) * c  # up-conv 2x2 halving the channels
        total += (2 * c * 9 + 1) * c + (c * 9 + 1) * c
        prev = c
    return total + (64 + 1) * classes


def test_classic_unet_paper_configuration():
    net = create_model("classic_unet", spatial_dims=2, in_channels=1, out_channels=2)
    assert net.output_shape((572, 572)) == (388, 388)
    assert net.input_shape_for((388, 388)) == (572, 572)
    enc = [m.out_channels for m in net.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert enc == [64, 64, 128, 128, 256, 256, 512, 512, 1024, 1024]
    assert [u.conv.out_channels for u in reversed(net.upsamplers)] == [512, 256, 128, 64]
    assert count_parameters(net) == _paper_unet_parameters(1, 2)
    # Reduced width (same layer layout): a real 572x572 forward gives 388x388.
    small = create_model("classic_unet", spatial_dims=2, in_channels=1, out_channels=2, features=[2, 4, 8, 16, 32])
    with torch.no_grad():
        assert small(torch.randn(1, 1, 572, 572)).shape == (1, 2, 388, 388)


@pytest.mark.slow
def test_classic_unet_full_width_forward_572():
    net = create_model("classic_unet", spatial_dims=2, in_channels=1, out_channels=2).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 572, 572)).shape == (1, 2, 388, 388)


VALID_NETS = {
    "classic": ("classic_unet", 2, {"features": [2, 4, 4, 8, 8]}),
    "conv3d-aniso": ("unet", 3, {"features": [2, 4, 4], "strides": [1, [1, 2, 2], 2],
                                 "kernel_sizes": [[1, 3, 3], 3, 3], "padding": "valid"}),
    "interp-residual": ("res_unet", 2, {"features": [2, 4, 4], "padding": "valid", "upsample": "interp",
                                        "pooling": "avg", "convs_per_stage": [1, 2, 2]}),
    "attention": ("attention_unet", 2, {"features": [2, 4, 4], "padding": "valid"}),
}


@pytest.mark.parametrize("key", sorted(VALID_NETS))
def test_valid_output_shape_matches_forward(key):
    name, dims, kwargs = VALID_NETS[key]
    net = create_model(name, spatial_dims=dims, in_channels=1, out_channels=2, **kwargs).eval()
    for n in (35, 36, 41) if dims == 3 else (188, 189, 201, 230):
        shape = (n, n + 3) if dims == 2 else (n, n, n + 1)
        with torch.no_grad():
            out = net(torch.randn(1, 1, *shape))
        assert tuple(out.shape[2:]) == net.output_shape(shape), shape
    # The smallest usable input works; one voxel less fails in the forward and in output_shape alike.
    smallest = list(net.input_shape_for((1,) * dims))
    with torch.no_grad():
        assert tuple(net(torch.randn(1, 1, *smallest)).shape[2:]) == net.output_shape(smallest)
        smallest[0] -= 1
        with pytest.raises(RuntimeError):
            net(torch.randn(1, 1, *smallest))
    with pytest.raises(ConfigError):
        net.output_shape(smallest)
    target = (30,) * dims
    need = net.input_shape_for(target)
    assert all(o >= t for o, t in zip(net.output_shape(need), target))
    for axis in range(dims):  # minimal: one voxel less on any axis no longer covers the target
        smaller = list(need)
        smaller[axis] -= 1
        try:
            assert net.output_shape(smaller)[axis] < target[axis]
        except ConfigError:
            pass


def test_valid_input_too_small_raises():
    net = create_model("classic_unet", spatial_dims=2, in_channels=1, out_channels=2, features=[2, 2, 2, 2, 2])
    with pytest.raises(ConfigError, match="input_shape"):
        net.output_shape((60, 60))


@pytest.mark.parametrize(
    ("name", "dims", "kwargs", "edge"),
    [
        ("unet", 3, {"features": [4, 8, 8], "deep_supervision": True, "dropout": 0.1}, 16),
        ("attention_unet", 2, {"features": [4, 8, 8], "norm": "batch"}, 16),
        ("unetpp", 2, {"features": [4, 4, 8, 8, 16, 4], "deep_supervision": True}, 32),
        pytest.param("swin_unetr", 2, {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]},
                     64, marks=needs_einops),
    ],
)
def test_rebuild_from_spec_reproduces_outputs(tmp_path, name, dims, kwargs, edge):
    torch.manual_seed(1)
    net = create_model(name, spatial_dims=dims, in_channels=1, out_channels=3, **kwargs)
    net.train()
    net(torch.randn(2, 1, *([edge] * dims)))  # update batch-norm running statistics
    path = tmp_path / "ckpt.pt"
    torch.save({"network": model_spec(net), "state_dict": net.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    spec = json.loads(json.dumps(ckpt["network"]))  # as stored in model.json
    torch.manual_seed(99)
    rebuilt = build_model(spec)
    rebuilt.load_state_dict(ckpt["state_dict"])
    net.eval()
    rebuilt.eval()
    x = torch.randn(1, 1, *([edge] * dims))
    with torch.no_grad():
        assert torch.equal(net(x), rebuilt(x))


def test_build_model_rejects_incomplete_spec():
    with pytest.raises(ConfigError):
        build_model({"name": "unet", "kwargs": {"features": [4, 8]}})
    with pytest.raises(ConfigError):
        build_model({"kwargs": {}})


@pytest.mark.parametrize("dims", [2, 3])
def test_bf16_autocast_and_channels_last(dims):
    torch.manual_seed(0)
    net = create_model("unet", spatial_dims=dims, in_channels=1, out_channels=2, features=[4, 8, 16],
                       deep_supervision=True)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    x = torch.randn(2, 1, *([16] * dims))
    ref = [o.detach() for o in net(x)]
    net_cl = net.to(memory_format=fmt)
    outs = net_cl(x.to(memory_format=fmt))
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = net_cl(x.to(memory_format=fmt))
    assert outs[0].dtype == torch.bfloat16
    loss = sum(o.float().square().mean() for o in outs)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net_cl.parameters() if p.grad is not None)
    torch.testing.assert_close(outs[0].float(), ref[0], rtol=0.1, atol=0.1)


@pytest.mark.parametrize("variant", [
    {"norm": "group", "norm_groups": 2},
    {"norm": "none", "act": ["prelu", {}]},
    {"pooling": "max", "upsample": "interp"},
    {"pooling": "avg", "residual": True, "attention": True, "act": "gelu"},
])
def test_unet_option_variants(variant):
    net = create_model("unet", spatial_dims=2, in_channels=1, out_channels=2, features=[4, 8, 8], **variant)
    out = net(torch.randn(2, 1, 20, 20))
    assert out.shape == (2, 2, 20, 20)
    out.sum().backward()


def test_same_padding_handles_sizes_not_divisible_by_strides():
    net = create_model("unet", spatial_dims=2, in_channels=1, out_channels=2, features=[4, 8, 8])
    assert net(torch.randn(1, 1, 21, 18)).shape == (1, 2, 21, 18)
    assert net.output_shape((21, 18)) == (21, 18)


def test_attention_maps_returned():
    net = create_model("attention_unet", spatial_dims=3, in_channels=1, out_channels=2, features=[4, 8, 8]).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        logits, maps = net.forward_with_attention(x)
        torch.testing.assert_close(logits, net(x))
    assert [tuple(m.shape) for m in maps] == [(1, 1, 16, 16, 16), (1, 1, 8, 8, 8)]
    assert all(float(m.min()) >= 0 and float(m.max()) <= 1 for m in maps)
    plain = UNet(spatial_dims=2, in_channels=1, out_channels=2, features=[4, 8])
    with pytest.raises(ConfigError):
        plain.forward_with_attention(torch.randn(1, 1, 8, 8))


# Memory estimate vs measured peak (CPU profiler allocation events). Stated tolerance: 15% (fp32),
# 25% (bf16 autocast: oneDNN reorder buffers are not modelled). Batch >= 2 (see memory.py on CPU paths).
MEMORY_CASES = [
    ("unet", {"features": [8, 16, 32], "deep_supervision": True}, 3, (24, 24, 24), 2, torch.float32, True, 0.15),
    ("unet", {"features": [8, 16, 32, 64]}, 2, (64, 64), 4, torch.float32, True, 0.15),
    ("unet", {"features": [8, 16, 32]}, 2, (64, 64), 2, torch.bfloat16, True, 0.25),
    ("attention_unet", {"features": [8, 16, 32]}, 2, (64, 64), 2, torch.float32, False, 0.15),
]


@pytest.mark.parametrize("case", MEMORY_CASES, ids=lambda c: f"{c[0]}-{c[2]}d-{c[5]}-train{c[6]}")
def test_memory_estimate_matches_measured_peak(case):
    name, kwargs, dims, patch, batch, dtype, training, tol = case
    est = estimate_memory(name, kwargs, dims, 1, 3, patch, batch, dtype=dtype, training=training)
    meas = measure_peak_memory(name, kwargs, dims, 1, 3, patch, batch, dtype=dtype, training=training)
    assert meas > 0
    assert abs(est - meas) / meas <= tol, (est, meas)


def test_memory_estimate_scales_with_batch_and_rejects_bad_args():
    args = ("unet", {"features": [8, 16, 32]}, 3, 1, 2, (32, 32, 32))
    one, four = estimate_memory(*args, 1), estimate_memory(*args, 4)
    assert 2.5 < four / one < 4.1
    adam = estimate_memory(*args, 1, optimizer="adamw")
    assert adam > one
    with pytest.raises(ConfigError):
        estimate_memory("unet", {}, 3, 1, 2, (32, 32), 1)
    with pytest.raises(ConfigError):
        estimate_memory("unet", {}, 3, 1, 2, (32, 32, 32), 1, dtype=torch.int8)
