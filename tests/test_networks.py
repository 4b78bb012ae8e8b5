"""Tests of medseg.networks: registry, the network contract, every registered model in 2D/3D, each U-Net option,
valid padding, specs, deprecated names, AMP, memory."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import pickle

import pytest
import torch
from torch import nn

from medseg.errors import ConfigError
from medseg.networks import (
    SegmentationNetwork,
    UNet,
    build_model,
    count_parameters,
    create_model,
    estimate_memory,
    list_models,
    measure_peak_memory,
    model_entry,
    model_spec,
    register_model,
    register_model_deprecations,
    valid_crop,
)
from medseg.networks import registry as registry_module

torch.set_num_threads(1)

HAS_EINOPS = importlib.util.find_spec("einops") is not None
needs_einops = pytest.mark.skipif(not HAS_EINOPS, reason="swin_unetr needs einops (MONAI optional dependency), not installed")

# Tiny options per registered model and a small input per spatial dimension (None: dimension unsupported).
# Some axes are deliberately not divisible by the strides, so output_shape is checked where it is not trivial
# (max pooling floors: unet3d maps 21 -> 20); U-Net++ needs >= 16, Swin-UNETR multiples of 32 (and more than one
# bottleneck voxel in training).
TINY = {
    "unet": ({"features": [4, 8, 16]}, (16, 21), (16, 12, 21)),
    "unet3d": ({"features": [4, 8, 16], "strides": [1, 2, 2]}, None, (16, 12, 21)),
    "attention_unet": ({"features": [4, 8, 16]}, (16, 21), (16, 12, 21)),
    "res_unet": ({"features": [4, 8, 16]}, (16, 21), (16, 12, 21)),
    "classic_unet": ({"features": [4, 8, 16, 32, 64]}, (188, 190), None),
    "unetpp": ({"features": [4, 4, 8, 8, 16, 4]}, (32, 21), (16, 32, 21)),
    "swin_unetr": ({"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]}, (64, 32), (64, 32, 32)),
}
# Models that take the deep_supervision option but reject True (they have a single output).
NO_DEEP_SUPERVISION = {"swin_unetr"}


def _supports_deep_supervision(name: str) -> bool:
    return "deep_supervision" in model_entry(name).options and name not in NO_DEEP_SUPERVISION


CASES = [
    pytest.param(name, dims, ds, id=f"{name}-{dims}d" + ("-ds" if ds else ""),
                 marks=[needs_einops] if name == "swin_unetr" else [])
    for dims in (2, 3)
    for name in list_models(dims)
    for ds in ((False, True) if _supports_deep_supervision(name) else (False,))
]


def test_registry_lists_every_model_and_each_has_a_tiny_case():
    assert set(list_models()) == set(TINY)
    assert "classic_unet" not in list_models(3) and "unet3d" not in list_models(2)
    for name, (_, shape2, shape3) in TINY.items():
        assert [d for d, s in ((2, shape2), (3, shape3)) if s is not None] == list(model_entry(name).spatial_dims)


@pytest.mark.parametrize(("name", "dims", "ds"), CASES)
def test_every_model_contract_forward_backward(name, dims, ds):
    kwargs, *shapes = TINY[name]
    shape = shapes[dims - 2]
    if ds:
        kwargs = {**kwargs, "deep_supervision": True}
    torch.manual_seed(0)
    model = create_model(name, spatial_dims=dims, in_channels=2, out_channels=3, **kwargs).train()
    assert isinstance(model, SegmentationNetwork)
    assert (model.spatial_dims, model.in_channels, model.out_channels, model.deep_supervision) == (dims, 2, 3, ds)
    assert model.medseg_spec == model_spec(model) and model_spec(model)["name"] == name
    full = model.output_shape(shape)
    loss = [n - o for n, o in zip(shape, full)]
    if any(v % 2 for v in loss):  # unet3d: max pooling floors 21 -> 10, the output (20) is not centred
        with pytest.raises(ConfigError, match="odd loss"):
            valid_crop(model, shape)
    else:
        assert valid_crop(model, shape) == tuple(v // 2 for v in loss)

    x = torch.randn(2, 2, *shape)
    out = model(x)
    scales = model.deep_supervision_scales
    assert isinstance(out, list) == ds and (len(scales) > 1) == ds
    outs = out if ds else [out]
    assert len(outs) == len(scales)
    assert tuple(outs[0].shape) == (2, 3, *full)  # output_shape is the real forward's shape
    if full == shape:  # same padding: the lower-resolution outputs are the input shape over their scale
        for o, scale in zip(outs, scales):
            for n, f, got in zip(full, scale, o.shape[2:]):
                assert math.floor(n / f) <= got <= math.ceil(n / f), (o.shape, scale)

    sum(o.float().square().mean() for o in outs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0]
    assert not missing and not zero, (missing, zero)

    model.eval()
    with torch.no_grad():
        y = model(x)
    assert isinstance(y, torch.Tensor) and tuple(y.shape) == (2, 3, *full)


def test_models_rejecting_deep_supervision_say_so():
    # Every model with a deep_supervision option either honours it (cases above) or rejects True clearly.
    assert all("deep_supervision" in model_entry(n).options for n in NO_DEEP_SUPERVISION)
    with pytest.raises(ConfigError, match="deep_supervision" if HAS_EINOPS else "einops"):
        create_model("swin_unetr", spatial_dims=2, in_channels=1, out_channels=2, deep_supervision=True)


@pytest.mark.parametrize(("name", "dims"), [("unet", 2), ("attention_unet", 2), ("res_unet", 2),
                                            ("classic_unet", 2), ("unet3d", 3)])
def test_unet_family_has_no_redundant_parameters(name, dims):
    """In float64, every parameter's gradient is far above rounding noise: no bias cancelled by a norm."""
    kwargs, *shapes = TINY[name]
    torch.manual_seed(0)
    model = create_model(name, spatial_dims=dims, in_channels=2, out_channels=3, deep_supervision=True,
                         **kwargs).double().train()
    outs = model(torch.randn(2, 2, *shapes[dims - 2], dtype=torch.float64))
    sum(o.square().mean() for o in outs).backward()
    top = max(float(p.grad.abs().max()) for p in model.parameters())
    tiny = [n for n, p in model.named_parameters() if float(p.grad.abs().max()) < 1e-9 * top]
    assert not tiny, tiny


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


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry for tests that register models or deprecations (restored afterwards)."""
    list_models()  # register the built-in models first
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    monkeypatch.setattr(registry_module, "_DEPRECATIONS", dict(registry_module._DEPRECATIONS))
    return registry_module


def test_deprecated_name_loads_old_checkpoint(scratch_registry, tmp_path):
    kwargs = {"features": [4, 8, 8], "deep_supervision": True}
    torch.manual_seed(0)
    old = create_model("res_unet", spatial_dims=2, in_channels=1, out_channels=2, **kwargs)
    # A run folder written while the model was called "resunet": its spec holds the old name.
    spec = json.loads(json.dumps({**model_spec(old), "name": "resunet"}))
    torch.save({"network": spec, "state_dict": old.state_dict()}, tmp_path / "ckpt.pt")
    register_model_deprecations({"resunet": "res_unet"})
    assert "resunet" not in list_models()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    with pytest.warns(FutureWarning, match="'resunet' is deprecated; building 'res_unet'"):
        rebuilt = build_model(ckpt["network"])
    rebuilt.load_state_dict(ckpt["state_dict"])
    assert model_spec(rebuilt) == {**spec, "name": "res_unet"}
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(old.eval()(x), rebuilt.eval()(x))
    with pytest.warns(FutureWarning):
        assert model_entry("resunet") is model_entry("res_unet")
    with pytest.warns(FutureWarning):
        net = create_model("resunet", spatial_dims=2, in_channels=1, out_channels=2, features=[4, 8])
    assert model_spec(net)["name"] == "res_unet" and isinstance(net, UNet)


def test_deprecations_are_checked(scratch_registry):
    with pytest.raises(ValueError, match="not a registered model"):
        register_model_deprecations({"old_net": "no_such_net"})
    with pytest.raises(ValueError, match="already a model name"):
        register_model_deprecations({"unet": "res_unet"})
    register_model_deprecations({"old_net": "unet"})
    with pytest.raises(ValueError, match="already a model name or a deprecated alias"):
        register_model_deprecations({"old_net": "res_unet"})
    with pytest.raises(ValueError, match="already registered"):
        register_model("old_net")(lambda *, spatial_dims, in_channels, out_channels: nn.Identity())


def test_register_model_checks_declared_options(scratch_registry):
    def forwards(*, spatial_dims, in_channels, out_channels, **kwargs):
        return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)

    def fixed(*, spatial_dims, in_channels, out_channels, features=(4, 8)):
        return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                    features=features)

    def no_channels(*, spatial_dims, width=4):
        return nn.Identity()

    with pytest.raises(ValueError, match="takes \\*\\*kwargs but declares no options_from"):
        register_model("undeclared")(forwards)
    with pytest.raises(ValueError, match="does not accept"):
        register_model("lost_options", options_from=UNet)(fixed)
    with pytest.raises(ValueError, match="missing in_channels, out_channels"):
        register_model("no_channels")(no_channels)
    with pytest.raises(ValueError, match="lower case"):
        register_model("MyUNet", options_from=UNet)(forwards)
    with pytest.raises(ValueError, match="already registered"):
        register_model("unet", options_from=UNet)(forwards)
    register_model("fixed_unet")(fixed)
    assert model_entry("fixed_unet").options == {"features"}
    assert "fixed_unet" in list_models(2)


class _PlainNet(nn.Module):
    """A third-party network that declares nothing of the contract."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(in_channels, out_channels, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_create_model_makes_third_party_networks_conform(scratch_registry):
    @register_model("plain_net")
    def plain_net(*, spatial_dims, in_channels, out_channels):
        return _PlainNet(spatial_dims, in_channels, out_channels)

    @register_model("liar_net")
    def liar_net(*, spatial_dims, in_channels, out_channels):
        net = _PlainNet(spatial_dims, in_channels, out_channels)
        net.spatial_dims = 5
        return net

    net = create_model("plain_net", spatial_dims=3, in_channels=2, out_channels=4)
    assert isinstance(net, SegmentationNetwork) and not isinstance(_PlainNet(3, 2, 4), SegmentationNetwork)
    assert (net.spatial_dims, net.in_channels, net.out_channels, net.deep_supervision) == (3, 2, 4, False)
    assert net.deep_supervision_scales == [(1, 1, 1)]
    assert net.output_shape((9, 10, 11)) == (9, 10, 11) == tuple(net(torch.randn(1, 2, 9, 10, 11)).shape[2:])
    assert valid_crop(net, (9, 10, 11)) == (0, 0, 0)
    with pytest.raises(ConfigError, match="input_shape"):
        net.output_shape((9, 10))
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert clone.output_shape((4, 4, 4)) == (4, 4, 4) and model_spec(clone) == model_spec(net)
    with pytest.raises(ValueError, match="declares spatial_dims=5"):
        create_model("liar_net", spatial_dims=2, in_channels=1, out_channels=2)


def test_valid_crop_from_output_shape():
    net = create_model("classic_unet", spatial_dims=2, in_channels=1, out_channels=2, features=[2, 4, 4, 8, 8])
    assert valid_crop(net, (572, 572)) == (92, 92)
    odd = next(n for n in range(560, 600) if (n - net.output_shape((n, n))[0]) % 2)
    with pytest.raises(ConfigError, match="patch_size.*odd loss"):
        valid_crop(net, (572, odd))
    with pytest.raises(ConfigError, match="input_shape"):
        valid_crop(net, (60, 60))
    with pytest.raises(TypeError, match="create_model"):
        valid_crop(nn.Conv2d(1, 1, 3), (8, 8))
    assert valid_crop(create_model("unetpp", spatial_dims=2, in_channels=1, out_channels=2,
                                   features=[4, 4, 8, 8, 16, 4]), (17, 40)) == (0, 0)
    with pytest.raises(ConfigError, match="at least 16"):
        create_model("unetpp", spatial_dims=2, in_channels=1, out_channels=2).output_shape((15, 32))


def test_unetpp_without_deep_supervision_loads_checkpoints_with_all_heads():
    kwargs = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "features": [4, 4, 8, 8, 16, 4]}
    with_heads = create_model("unetpp", deep_supervision=True, **kwargs)  # holds all four heads, as before
    plain = create_model("unetpp", **kwargs)
    assert not any("final_conv_0_1" in k for k in plain.state_dict())
    plain.load_state_dict(with_heads.state_dict())  # strict: the unused heads' weights are dropped
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), with_heads.eval()(x))


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


# Each U-Net option against a baseline: (baseline overrides, variant). A case id is "<option>" or
# "<option>-<what>"; every option of the "unet" entry must have a case, and each must change the parameter count
# or the training-mode output (same seeds), so an ignored option turns its case red.
OPTION_BASE = {"n_stages": 3, "base_features": 4}
OPTION_CASES = {
    "features": ({}, {"features": [4, 8, 12]}),
    "strides": ({}, {"strides": [1, 2, [2, 1]]}),
    "kernel_sizes": ({}, {"kernel_sizes": [3, 3, [3, 5]]}),
    "kernel_sizes-int": ({}, {"kernel_sizes": 5}),
    "n_stages": ({}, {"n_stages": 4}),
    "base_features": ({}, {"base_features": 6}),
    "max_features": ({}, {"max_features": 8}),
    "convs_per_stage": ({}, {"convs_per_stage": [2, 3, 2]}),
    "convs_per_stage-int": ({}, {"convs_per_stage": 1}),
    "decoder_convs": ({}, {"decoder_convs": 1}),
    "decoder_convs-list": ({}, {"decoder_convs": [2, 3]}),
    "norm-batch": ({}, {"norm": "batch"}),
    "norm-group": ({}, {"norm": "group", "norm_groups": 2}),
    "norm-none": ({}, {"norm": "none"}),
    "norm_groups": ({"norm": "group"}, {"norm": "group", "norm_groups": 2}),
    "act": ({}, {"act": "relu"}),
    "act-kwargs": ({}, {"act": ["leakyrelu", {"negative_slope": 0.3}]}),
    "act-prelu": ({}, {"act": ["prelu", {}]}),
    "dropout": ({}, {"dropout": 0.3}),
    "pooling-max": ({}, {"pooling": "max"}),
    "pooling-avg": ({}, {"pooling": "avg"}),
    "upsample": ({}, {"upsample": "interp"}),
    "padding": ({}, {"padding": "valid"}),
    "residual": ({}, {"residual": True}),
    "attention": ({}, {"attention": True}),
    "deep_supervision": ({}, {"deep_supervision": True}),
}


def _fingerprint(name: str, dims: int, edge: int, **kwargs) -> tuple[int, list[torch.Tensor]]:
    """Parameter count and training-mode outputs, with fixed seeds for the weights and the forward."""
    torch.manual_seed(0)
    net = create_model(name, spatial_dims=dims, in_channels=1, out_channels=2, **kwargs).train()
    torch.manual_seed(1)
    x = torch.randn(2, 1, *([edge] * dims))
    with torch.no_grad():
        out = net(x)
    return count_parameters(net), [o.detach() for o in (out if isinstance(out, list) else [out])]


def _same(a: tuple[int, list[torch.Tensor]], b: tuple[int, list[torch.Tensor]]) -> bool:
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(
        x.shape == y.shape and torch.allclose(x, y) for x, y in zip(a[1], b[1]))


def test_every_unet_option_has_a_case():
    assert {key.split("-")[0] for key in OPTION_CASES} == set(model_entry("unet").options)


def test_option_fingerprint_is_reproducible():
    assert _same(_fingerprint("unet", 2, 44, **OPTION_BASE), _fingerprint("unet", 2, 44, **OPTION_BASE))


@pytest.mark.parametrize("key", sorted(OPTION_CASES))
def test_unet_option_changes_the_network(key):
    base, variant = OPTION_CASES[key]
    ref = _fingerprint("unet", 2, 44, **{**OPTION_BASE, **base})
    got = _fingerprint("unet", 2, 44, **{**OPTION_BASE, **variant})
    assert not _same(ref, got), f"option {key} changed neither the parameter count nor the output"


# Each preset is "unet" plus its defaults: it differs from "unet", and undoing its defaults gives "unet" exactly.
PRESET_UNDO = {
    "attention_unet": (2, {"attention": False}),
    "res_unet": (2, {"residual": False}),
    "classic_unet": (2, {"norm": "instance", "act": "leakyrelu", "pooling": "conv", "padding": "same"}),
    "unet3d": (3, {"norm": "instance", "act": "leakyrelu", "pooling": "conv"}),
}


def test_every_preset_has_an_undo_case():
    assert set(PRESET_UNDO) == {n for n in list_models() if model_entry(n).builder.__module__.endswith("presets")} - {
        "unet"}


@pytest.mark.parametrize("name", sorted(PRESET_UNDO))
def test_preset_is_unet_with_its_defaults(name):
    dims, undo = PRESET_UNDO[name]
    edge = 44 if dims == 2 else 16
    tiny = {"features": [4, 8, 16]}
    plain = _fingerprint("unet", dims, edge, **tiny)
    assert not _same(_fingerprint(name, dims, edge, **tiny), plain)
    assert _same(_fingerprint(name, dims, edge, **tiny, **undo), plain)


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
