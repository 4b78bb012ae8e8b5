"""The cascade (``3d_cascade_fullres``): the 3d_lowres stage's out-of-fold predictions as extra one-hot input
channels while training, its prediction of the input at inference; the previous-stage map travels through the
spatial augmentation with the target, and is perturbed as nnU-Net perturbs it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


# ---------------------------------------------------------------------------------------------- augmentation
def _fake_cache(root, n=2, shape=(24, 24, 24), k=3):
    """A cache of ``n`` cases whose image equals the label and whose previous-stage map equals it too."""
    cache, prev = root / "cache", root / "previous_stage"
    cache.mkdir()
    prev.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        seg = np.zeros((1, *shape), np.int16)
        for c in range(1, k):
            lo = rng.integers(2, 12, 3)
            seg[0, lo[0]:lo[0] + 8, lo[1]:lo[1] + 6, lo[2]:lo[2] + 9] = c
        np.save(cache / f"c{i}.npy", seg.astype(np.float32))
        np.save(cache / f"c{i}_seg.npy", seg)
        np.save(prev / f"c{i}.npy", seg.astype(np.uint8))
        fg = {str(c): np.argwhere(seg[0] == c).tolist()[:50] for c in range(1, k)}
        (cache / f"c{i}.json").write_text(json.dumps({"shape": list(shape), "foreground": fg}))
    return cache, prev, [f"c{i}" for i in range(n)]


def test_previous_stage_map_gets_the_targets_spatial_augmentation(tmp_path, monkeypatch):
    """Rotation, scaling, elastic deformation and mirroring move the previous-stage channels exactly as the
    target (both nearest), and the intensity augmentation leaves them alone."""
    import medseg.transforms.cascade as cascade
    from medseg.data.loader import PatchLoader

    monkeypatch.setattr(cascade, "P_BINARY_OPERATOR", 0.0)  # no perturbation: the channels must equal the target
    monkeypatch.setattr(cascade, "P_REMOVE_COMPONENT", 0.0)
    cache, prev, ids = _fake_cache(tmp_path)
    aug = {"p_rotation": 1.0, "p_scale": 1.0, "p_elastic": 1.0, "p_mirror": 0.5, "p_noise": 1.0,
           "p_brightness": 1.0, "p_gamma": 1.0}
    loader = PatchLoader(cache, ids, patch_size=(16, 16, 16), batch_size=4, spatial_dims=3, augmentation=aug,
                         num_batches=3, previous_dir=prev, num_classes=3)
    moved = 0
    for batch in loader.epoch(0):
        image, label = batch["image"], batch["label"]
        assert image.shape == (4, 3, 16, 16, 16) and label.shape == (4, 1, 16, 16, 16)
        onehot = torch.stack([(label[:, 0] == c).float() for c in (1, 2)], dim=1)
        assert torch.equal(image[:, 1:], onehot)
        # the image channel (= the label before augmentation) was interpolated and intensity-augmented
        moved += int(not torch.allclose(image[:, 0], label[:, 0].float()))
    assert moved == 3


def test_previous_stage_perturbation_is_seeded_and_stays_one_hot(tmp_path):
    from medseg.transforms.cascade import attach_previous, one_hot_previous

    _, prev_dir, ids = _fake_cache(tmp_path, n=1, shape=(20, 20, 20))
    seg = torch.from_numpy(np.load(prev_dir / "c0.npy").astype(np.int64))[None].repeat(8, 1, 1, 1, 1)
    label = torch.cat([seg, seg], dim=1)
    image = torch.zeros(8, 1, 20, 20, 20)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(3)
        out, target = attach_previous(image, label, 3, g)
        assert out.shape == (8, 3, 20, 20, 20) and torch.equal(target, seg)
        assert out[:, 1:].sum(1).max() <= 1 and set(out[:, 1:].unique().tolist()) <= {0.0, 1.0}
        runs.append(out)
    assert torch.equal(runs[0], runs[1])  # the same generator state: the same perturbation
    clean = one_hot_previous(seg, 3)
    changed = [(runs[0][i, 1:] != clean[i]).any().item() for i in range(8)]
    assert any(changed) and not all(changed)  # some samples perturbed (p 0.4 / 0.2), others left as predicted
    plain, _ = attach_previous(image, label, 3, None)  # validation and inference: never perturbed
    assert torch.equal(plain[:, 1:], clean)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def cascade_plan(tmp_path_factory):
    """The demo set planned for a tiny GPU budget (3d_lowres and 3d_cascade_fullres planned), without test-time
    mirroring so that the fold predictions take seconds."""
    import dataclasses

    from medseg.data.demo import make_demo_dataset
    from medseg.data.manifest import load_manifest
    from medseg.planning import fingerprint, make_plan, save_plan

    tmp = tmp_path_factory.mktemp("cascade")
    data = make_demo_dataset(tmp / "data", n_cases=6, seed=1)
    plan = make_plan(fingerprint(load_manifest(data)), device="cuda", memory_gb=0.02, memory_model="analytic")
    assert plan.configurations["3d_cascade_fullres"].previous_stage == "3d_lowres", plan.explain
    plan.configurations = {k: dataclasses.replace(c, mirror_axes=[]) for k, c in plan.configurations.items()}
    save_plan(plan, tmp / "plan.json")
    return tmp, data, plan


def _pipeline(tmp, data, configuration):
    from medseg.training.config import load_pipeline

    return load_pipeline(None, {"dataset": str(data), "output": str(tmp / "run" / configuration),
                                "plan": str(tmp / "plan.json"), "configuration": configuration, "folds": 2,
                                "splits": None, "cache": str(tmp / "cache"),
                                "train": {"epochs": 1, "device": "cpu", "max_minutes": 2, "batches_per_epoch": 2,
                                          "threads": 1}})


@pytest.fixture(scope="module")
def cascade_run(cascade_plan):
    """3d_lowres cross-validated on fold 0, then the cascade tried (refused), 3d_lowres's fold 1, the cascade."""
    from medseg.errors import InputError
    from medseg.training.crossval import run_crossval

    tmp, data, plan = cascade_plan
    cascade = _pipeline(tmp, data, "3d_cascade_fullres")
    refusals = []
    for step in ([0], [0, 1]):
        try:
            run_crossval(cascade, [0, 1], device="cpu")
        except InputError as exc:
            refusals.append(str(exc))
        run_crossval(_pipeline(tmp, data, "3d_lowres"), step, device="cpu")
    summary = run_crossval(cascade, [0, 1], device="cpu")
    return tmp, data, plan, refusals, summary


def test_cascade_trains_on_out_of_fold_lowres_predictions_and_predicts_after_it(cascade_run):
    from medseg.inference import Predictor
    from medseg.io import Volume, read_volume
    from medseg.runtime import load_checkpoint
    from medseg.transforms.cascade import one_hot_previous
    from medseg.transforms.case import load_case
    from medseg.transforms.preprocess import preprocess_volume

    tmp, data, plan, refusals, summary = cascade_run
    k = plan.num_classes
    # without 3d_lowres, and with only its fold 0 predicted out of fold: refused in one line, naming the fix
    assert len(refusals) == 2 and all("\n" not in r and "cross-validate every fold of 3d_lowres" in r
                                      for r in refusals)
    assert "is not a trained 3d_lowres run folder" in refusals[0]
    assert "has no out-of-fold prediction of 3 of 6 cases" in refusals[1]
    assert summary["n_cases"] == 6

    run = tmp / "run"
    splits = json.loads((run / "3d_cascade_fullres" / "splits.json").read_text())
    cache = next((tmp / "cache").glob("*/3d_fullres"))  # the cascade trains on 3d_fullres's cache
    for fold, entry in enumerate(splits):
        for cid in entry["val"]:  # each case's map comes from the lowres fold that did not train on it
            stored = np.load(run / "3d_cascade_fullres" / "previous_stage" / f"{cid}.npy")
            case_img, _ = load_case(sorted((data / "imagesTr").glob(f"{cid}*")))
            oof = read_volume(run / "3d_lowres" / f"fold_{fold}" / "validation" / f"{cid}.nii.gz")
            _, expect, _ = preprocess_volume(case_img, plan, "3d_cascade_fullres", label=oof)
            np.testing.assert_array_equal(stored, expect)
            assert stored.shape[1:] == np.load(cache / f"{cid}.npy", mmap_mode="r").shape[1:]
    first_conv = next(v for v in load_checkpoint(run / "3d_cascade_fullres" / "fold_0" / "checkpoint_best.pt")
                      ["state_dict"].values() if v.ndim == 5)
    assert first_conv.shape[1] == 1 + (k - 1)  # the image and one channel per foreground class

    pred = Predictor.from_run(run / "3d_cascade_fullres", folds=[1], device="cpu")
    assert pred.previous is not None and pred.previous.config_name == "3d_lowres" and pred.previous.folds == [1]
    assert not pred.previous.options.postprocess  # the raw previous prediction, as in training
    vol, _ = load_case(sorted((data / "imagesTr").glob(f"{splits[1]['val'][0]}*")))
    prepared = pred.prepare(vol)
    first = pred.previous.predict(vol)
    _, expect, _ = preprocess_volume(vol, plan, "3d_cascade_fullres", label=first)
    assert prepared.image.shape[0] == k
    np.testing.assert_array_equal(prepared.image[1:], one_hot_previous(expect[None], k)[0].numpy())
    probs = pred.predict_array(prepared.image)
    out = pred.predict(vol)
    assert out.array.shape[1:] == vol.array.shape[1:]
    np.testing.assert_allclose(out.affine, vol.affine)
    # the network reads the previous stage: an all-background first stage changes its probabilities
    pred.previous.predict = lambda v: Volume(np.zeros((1, *v.array.shape[1:]), np.uint8), v.affine, v.spatial_dims)
    blank = pred.prepare(vol)
    assert not blank.image[1:].any()
    assert not torch.allclose(pred.predict_array(blank.image), probs)


def test_cascade_stage_is_not_packaged_alone(cascade_run, tmp_path):
    """A model package holds one configuration; a cascade stage needs its first stage: refused in one line."""
    from medseg.cli.main import main

    stage = cascade_run[0] / "run" / "3d_cascade_fullres"
    assert main(["-q", "export-model", str(stage), "-o", str(tmp_path / "m.zip")]) != 0
    assert not (tmp_path / "m.zip").exists()


@pytest.mark.slow  # three configurations x two folds: about two minutes on 2 cores
def test_crossval_without_a_configuration_trains_the_cascade_when_every_fold_runs(tmp_path):
    """No configuration named, every fold run: 3d_fullres, 3d_lowres and the cascade are trained (in that order),
    find-best scores the cascade alone and in pairs, and the chosen candidate predicts through the selection."""
    import medseg.training.recipe as recipe
    from medseg.data.demo import make_demo_dataset
    from medseg.data.manifest import load_manifest
    from medseg.inference import Predictor
    from medseg.planning import fingerprint, make_plan, save_plan
    from medseg.planning.selection import load_selection
    from medseg.training.config import load_pipeline
    from medseg.training.crossval import run_crossval
    from medseg.transforms.case import load_case

    data = make_demo_dataset(tmp_path / "data", n_cases=6, seed=1)
    plan = make_plan(fingerprint(load_manifest(data)), device="cuda", memory_gb=0.02, memory_model="analytic")
    save_plan(plan, tmp_path / "plan.json")
    original = recipe.train_recipe
    recipe.train_recipe = lambda d, m: ({**original(d, m)[0], "batches_per_epoch": 2, "threads": 1},
                                        original(d, m)[1])
    try:
        pipeline = load_pipeline(None, {"dataset": str(data), "output": str(tmp_path / "run"), "folds": 2,
                                        "plan": str(tmp_path / "plan.json"),
                                        "train": {"epochs": 1, "device": "cpu", "max_minutes": 3}})
        summary = run_crossval(pipeline, [0, 1], device="cpu")
    finally:
        recipe.train_recipe = original
    sel = load_selection(tmp_path / "run")
    names = ["3d_fullres", "3d_lowres", "3d_cascade_fullres"]
    assert sel is not None and sel.members == names
    assert {"3d_cascade_fullres", "3d_lowres+3d_cascade_fullres", "3d_fullres+3d_cascade_fullres"} <= set(sel.candidates)
    assert sel.budget["minutes"] == {n: pytest.approx(1.0) for n in names}
    assert summary["chosen"] == "+".join(sel.chosen)
    pred = Predictor.from_run(tmp_path / "run", device="cpu")
    vol, _ = load_case(sorted((data / "imagesTr").glob("*.nii.gz"))[:1])
    out = pred.predict(vol)
    assert out.array.shape[1:] == vol.array.shape[1:]
