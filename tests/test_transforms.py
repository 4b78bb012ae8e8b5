"""Preprocessing and its exact inverse; batch augmentation alignment and reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.errors import ConfigError, InputError
from medseg.io import Volume
from medseg.planning import Normalization
from medseg.transforms.augment import augment_batch, make_generator
from medseg.transforms.case import from_ras, to_ras
from medseg.transforms.preprocess import normalize, preprocess_volume, restore_original

NO_INTENSITY = {"p_noise": 0, "p_blur": 0, "p_brightness": 0, "p_contrast": 0, "p_lowres": 0, "p_gamma": 0}


def _affine(spacing, perm=(0, 1, 2), flips=(1, 1, 1), angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot @ (np.eye(3)[:, list(perm)] * np.array(flips)) @ np.diag(spacing)
    a[:3, 3] = [10.0, -20.0, 5.0]
    return a


def _plan(spacing, dims=3, scheme="zscore"):
    from medseg.planning import Configuration, NetworkSpec, Normalization, Plan

    clip = [-1e9, 1e9] if scheme == "ct" else None
    conf = Configuration(spacing=list(spacing), patch_size=[8] * dims, batch_size=2, network=NetworkSpec("unet"))
    return Plan(dataset="t", spatial_dims=dims, in_channels=1, num_classes=3, labels={0: "bg", 1: "a", 2: "b"},
                normalization=[Normalization(scheme, clip=clip)], configurations={"cfg": conf})


def _case(shape, affine, rng):
    img = np.zeros(shape, np.float32)
    img[2:-2, 3:-1, 1:-1] = rng.normal(100, 20, [s - k for s, k in zip(shape, (4, 4, 2))])
    zz = np.indices(shape)
    c = [s / 2 for s in shape]
    r = np.sqrt(sum(((z - ci) / (s / 4)) ** 2 for z, ci, s in zip(zz, c, shape)))
    lab = np.zeros(shape, np.int16)
    lab[r < 1.2] = 1
    lab[(r < 1.2) & (zz[0] > c[0])] = 2
    return Volume(img[None], affine), Volume(lab[None], affine)


@pytest.mark.parametrize("perm,flips,angle", [((0, 1, 2), (1, 1, 1), 0.0), ((2, 0, 1), (-1, 1, -1), 0.0),
                                              ((1, 0, 2), (1, -1, 1), 0.4)])
def test_to_ras_roundtrip_and_world_positions(perm, flips, angle):
    aff = _affine((1.5, 2.0, 3.0), perm, flips, angle)
    arr = np.random.default_rng(0).random((2, 4, 5, 6))
    ras, aff_ras, ornt = to_ras(arr, aff, 3)
    assert np.array_equal(from_ras(ras, ornt), arr)
    for idx in [(0, 0, 0), (3, 4, 5), (1, 2, 3)]:
        world = aff @ np.array([*idx, 1.0])
        j = np.rint(np.linalg.solve(aff_ras, world)[:3]).astype(int)
        assert ras[(1, *j)] == arr[(1, *idx)]
    axes_world = np.argmax(np.abs(aff_ras[:3, :3]), axis=0)
    assert list(axes_world) == [0, 1, 2]  # voxel axes now closest to R, A, S
    assert np.all(np.diag(aff_ras[:3, :3]) > 0)


@pytest.mark.parametrize("perm,flips,angle", [((0, 1, 2), (1, 1, 1), 0.0), ((2, 0, 1), (-1, 1, -1), 0.3)])
def test_identity_plan_inverse_is_exact(perm, flips, angle):
    rng = np.random.default_rng(1)
    spacing = (0.8, 1.1, 2.5)
    img, lab = _case((24, 20, 12), _affine(spacing, perm, flips, angle), rng)
    ras_spacing = list(np.linalg.norm(to_ras(img.array, img.affine, 3)[1][:3, :3], axis=0))
    x, seg, props = preprocess_volume(img, _plan(ras_spacing), "cfg", lab)
    assert props["crop_shape"] == props["shape"]  # no resampling
    assert x.dtype == np.float32 and seg.dtype == np.int16
    back = restore_original(seg, props, is_label=True)
    assert back.shape == lab.array.shape and np.array_equal(back, lab.array)
    restored = img.with_array(back)
    assert restored.same_geometry(img)
    # probabilities: outside the nonzero crop the restored map is certain background
    probs = np.stack([seg[0] == k for k in range(3)]).astype(np.float32)
    pb = restore_original(probs, props, is_label=False)
    assert pb.shape == (3, *img.shape) and np.allclose(pb.sum(0), 1.0)
    assert np.array_equal(np.argmax(pb, 0)[None], lab.array)


@pytest.mark.parametrize("target", [(1.0, 1.0, 1.0), (0.6, 0.6, 1.5)])
def test_resampled_oblique_anisotropic_inverse_within_one_voxel(target):
    rng = np.random.default_rng(2)
    img, lab = _case((40, 36, 14), _affine((0.7, 0.9, 2.6), (1, 0, 2), (-1, 1, 1), 0.35), rng)
    x, seg, props = preprocess_volume(img, _plan(target), "cfg", lab)
    assert props["shape"] != props["crop_shape"]
    assert x.shape[1:] == seg.shape[1:] == tuple(props["shape"])
    # the plan-space affine maps the label's centre of mass to the same world point
    def com(a, aff):
        return (aff @ np.array([*ndimage.center_of_mass(a > 0), 1.0]))[:3]
    assert np.linalg.norm(com(seg[0], np.array(props["affine"])) - com(lab.array[0], img.affine)) < 1.0
    back = restore_original(seg, props, is_label=True)
    assert back.shape == lab.array.shape
    for k in (1, 2):
        ref, got = lab.array[0] == k, back[0] == k
        boundary = ndimage.binary_dilation(ref) & ~ndimage.binary_erosion(ref)
        wrong = ref ^ got
        assert wrong.sum() < 0.5 * ref.sum()
        assert not np.any(wrong & ~boundary), f"class {k}: mismatches away from the boundary"


def test_normalisation_schemes():
    x = np.random.default_rng(3).normal(50, 10, (2, 8, 8, 8)).astype(np.float32)
    x[1, :2] = 0
    z = normalize(x, [Normalization("zscore"), Normalization("zscore_nonzero")])
    assert abs(z[0].mean()) < 1e-4 and abs(z[0].std() - 1) < 1e-3
    nz = z[1][x[1] != 0]
    assert abs(nz.mean()) < 1e-4 and abs(nz.std() - 1) < 1e-3 and np.all(z[1][x[1] == 0] == 0)
    ct = normalize(x[:1], [Normalization("ct", mean=50.0, std=5.0, clip=[45.0, 55.0])])
    assert ct.min() == pytest.approx(-1.0) and ct.max() == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        normalize(x, [Normalization("zscore")])  # one entry for two channels
    with pytest.raises(InputError, match="scheme"):  # the plan loader refuses an unknown scheme
        Normalization.from_dict({"scheme": "minmax"}, "plan.json")
    # a first-release plan's flag spelling migrates to the scheme name
    assert Normalization.from_dict({"scheme": "zscore", "use_nonzero_mask": True}).scheme == "zscore_nonzero"


def test_preprocess_rejects_wrong_channels_and_config():
    img = Volume(np.ones((2, 4, 4, 4), np.float32), np.eye(4), meta={"source": "a.nii.gz"})
    with pytest.raises(InputError, match="channels"):
        preprocess_volume(img, _plan((1, 1, 1)), "cfg")
    with pytest.raises(ConfigError):
        preprocess_volume(Volume(np.ones((1, 4, 4, 4), np.float32), np.eye(4)), _plan((1, 1, 1)), "3d_lowres")


def _box_batch(b=4, size=(24, 32, 20)):
    lab = torch.zeros(b, 1, *size, dtype=torch.long)
    lab[:, :, 6:18, 8:22, 5:15] = 1
    img = lab.float() * 2.0 - 1.0
    return img, lab


@pytest.mark.parametrize("kind", ["rotation", "scale", "elastic"])
def test_spatial_augmentation_keeps_label_on_structure(kind):
    img, lab = _box_batch()
    params = {**NO_INTENSITY, "mirror_axes": [], "p_rotation": 0, "p_scale": 0, "p_elastic": 0,
              "rotation_deg": 40.0, "elastic_magnitude": 3.0}
    params[{"rotation": "p_rotation", "scale": "p_scale", "elastic": "p_elastic"}[kind]] = 1.0
    out_img, out_lab = augment_batch(img, lab, params, make_generator(0, 0, 0, 0))
    assert out_img.shape == img.shape and out_lab.dtype == lab.dtype
    assert not torch.equal(out_lab, lab)  # the transform did move the structure
    structure = out_img > 0  # the box's edges are where the image crosses 0
    for i in range(img.shape[0]):
        s, lab_i = structure[i, 0].numpy(), out_lab[i, 0].numpy() == 1
        dice = 2 * (s & lab_i).sum() / (s.sum() + lab_i.sum())
        assert dice > 0.97, f"{kind}: image and label disagree (Dice {dice:.3f})"
        edge = ndimage.binary_dilation(lab_i) & ~ndimage.binary_erosion(lab_i)
        assert not np.any((s ^ lab_i) & ~edge)
    assert torch.equal(img, _box_batch()[0])  # inputs untouched


def test_rotation_is_rigid_in_voxel_space_for_non_cubic_patches():
    lab = torch.zeros(2, 1, 20, 40, 30, dtype=torch.long)
    lab[:, :, 6:14, 14:26, 11:19] = 1  # centred, so a rotation keeps it inside the patch
    img = lab.float()
    params = {**NO_INTENSITY, "mirror_axes": [], "p_rotation": 1.0, "p_scale": 0}
    _, out = augment_batch(img, lab, params, make_generator(5, 0, 0, 0))
    def inertia(mask):  # eigenvalues of the coordinate covariance: kept by rotations, changed by shear
        return np.sort(np.linalg.eigvalsh(np.cov(np.argwhere(mask.numpy()).T.astype(float))))

    ref = inertia(lab[0, 0] == 1)
    for i in range(2):
        assert not torch.equal(out[i], lab[i])
        assert np.allclose(inertia(out[i, 0] == 1), ref, rtol=0.12)


def test_augmentation_reproducible_and_worker_dependent():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(6, 1, 16, 20, 12, generator=g)
    lab = (torch.rand(6, 1, 16, 20, 12, generator=g) > 0.5).long()
    params = {"p_rotation": 0.5, "p_scale": 0.5, "p_elastic": 0.3, "p_blur": 0.5, "p_lowres": 0.5, "p_gamma": 0.5}
    a = augment_batch(img, lab, params, make_generator(1, 0, 3, 0))
    b = augment_batch(img, lab, params, make_generator(1, 0, 3, 0))
    c = augment_batch(img, lab, params, make_generator(1, 0, 3, 1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_mirroring_flips_image_and_label_together_and_intensity_only_touches_image():
    img, lab = _box_batch(b=8)
    img = img + torch.linspace(0, 1, img.shape[-1])  # asymmetric along the last axis
    params = {"p_rotation": 0, "p_scale": 0, "p_mirror": 0.5, "p_noise": 1.0, "p_brightness": 1.0}
    out_img, out_lab = augment_batch(img, lab, params, make_generator(2, 0, 0, 0))
    flipped = [not torch.equal(out_lab[i], lab[i]) for i in range(8)]
    assert any(flipped)  # with 8 samples and 3 axes some flip changes the label
    assert not torch.allclose(out_img, img)
    assert set(out_lab.unique().tolist()) <= {0, 1}


def test_unknown_augmentation_key_is_an_error():
    img, lab = _box_batch(b=1)
    with pytest.raises(ConfigError, match="p_rotaton"):
        augment_batch(img, lab, {"p_rotaton": 1.0}, make_generator(0, 0, 0, 0))


def test_2d_augmentation_runs_and_aligns():
    lab = torch.zeros(3, 1, 32, 40, dtype=torch.long)
    lab[:, :, 8:24, 10:30] = 1
    img = lab.float() * 2 - 1
    params = {**NO_INTENSITY, "p_rotation": 1.0, "p_scale": 1.0, "p_elastic": 1.0}
    oi, ol = augment_batch(img, lab, params, make_generator(0, 0, 0, 0))
    s, l1 = oi > 0, ol == 1
    assert 2 * (s & l1).sum() / (s.sum() + l1.sum()) > 0.95


@pytest.mark.parametrize("target", [(0.5, 0.5), (0.35, 0.8)])
def test_2d_image_preprocess_and_inverse(target):
    aff = np.diag([0.5, 0.5, 1.0, 1.0])
    lab = np.zeros((1, 60, 48), np.int16)
    lab[0, 20:40, 10:30] = 1
    img = Volume((lab.astype(np.float32) * 50 + 10), aff, 2)
    x, seg, props = preprocess_volume(img, _plan(target, dims=2), "cfg", Volume(lab, aff, 2))
    assert x.ndim == 3 and seg.shape[1:] == tuple(props["shape"])
    back = restore_original(seg, props, is_label=True)
    assert back.shape == lab.shape
    if target == (0.5, 0.5):
        assert np.array_equal(back, lab)
    ref = lab[0] == 1
    edge = ndimage.binary_dilation(ref) & ~ndimage.binary_erosion(ref)
    assert not np.any((ref ^ (back[0] == 1)) & ~edge)


def test_acquisition_frame_puts_each_cases_coarse_axis_last_and_restores_exactly():
    """A plan in the acquisition frame (cases stored in different orientations): the same 1x1x6 mm stack written
    with its coarse axis on each RAS axis preprocesses to one shape (coarse axis last) and restores exactly."""
    import dataclasses

    rng = np.random.default_rng(0)
    base = np.zeros((20, 18, 6), np.float32)
    base[4:15, 3:14, 1:5] = rng.normal(100, 5, (11, 11, 4))
    lab = (base > 0).astype(np.int16)
    plan = _plan((1.0, 1.0, 6.0))
    plan.configurations["cfg"] = dataclasses.replace(plan.configurations["cfg"], frame="acquisition")
    shapes = []
    for axes in ((0, 1, 2), (2, 0, 1), (1, 2, 0)):  # the coarse axis lands on RAS axis 2, 0 and 1
        img = np.transpose(base, axes)
        seg = np.transpose(lab, axes)
        spacing = np.array([1.0, 1.0, 6.0])[list(axes)]
        aff = np.diag([*spacing, 1.0])
        x, s, props = preprocess_volume(Volume(img[None], aff), plan, "cfg", Volume(seg[None], aff))
        shapes.append(x.shape)
        assert props["spacing"][2] == pytest.approx(6.0)  # the coarse axis is last in plan space
        back = restore_original(s, props, is_label=True)
        np.testing.assert_array_equal(back[0], seg)
    assert len(set(shapes)) == 1


def test_absurd_spacing_is_refused_before_resampling():
    """A case whose grid at the plan spacing would need terabytes (an absurd voxel size in its header) is refused in
    one line naming the file, at training time too, before the resampler allocates."""
    from medseg.io.guard import SizeLimitError

    aff = np.diag([5e4, 5e4, 5e4, 1.0])  # 50 m voxels: at 1 mm that is 5e13 voxels per axis cubed
    img = Volume(np.ones((1, 8, 8, 8), np.float32), aff, meta={"source": "huge.nii.gz"})
    with pytest.raises(SizeLimitError, match="huge.nii.gz"):
        preprocess_volume(img, _plan((1.0, 1.0, 1.0)), "cfg")
