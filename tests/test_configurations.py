"""Every configuration of the plan trained, the best one or pair chosen from out-of-fold Dice (nnU-Net's
find_best_configuration), recorded in the model record and used by the Predictor; and `medseg crossval` / `medseg
train` with no YAML on the synthetic demo, anisotropic and CT sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest


@pytest.fixture
def short_recipe(monkeypatch):
    """The recipe with 2 batches an epoch, so that `--epochs 1` runs in seconds (everything else as the CLI)."""
    import medseg.training.recipe as recipe

    original = recipe.train_recipe

    def short(device, minutes):
        options, reason = original(device, minutes)
        return {**options, "batches_per_epoch": 2, "threads": 1}, reason

    monkeypatch.setattr(recipe, "train_recipe", short)


# ---------------------------------------------------------------------------------------------- find_best
def _onehot(labels: np.ndarray, k: int = 3, confidence: float = 0.8) -> np.ndarray:
    p = np.full((k, *labels.shape), (1 - confidence) / (k - 1), np.float32)
    for c in range(k):
        p[c][labels == c] = confidence
    return p


def test_find_best_picks_the_single_or_the_pair_with_the_best_oof_dice():
    from medseg.training.find_best import find_best_configuration, score_candidates

    rng = np.random.default_rng(0)
    refs = {f"c{i}": rng.integers(0, 3, size=(6, 6, 6)) for i in range(4)}

    def noisy(ref, frac, seed):
        out = ref.copy()
        flip = np.random.default_rng(seed).random(ref.shape) < frac
        out[flip] = (out[flip] + 1) % 3
        return out

    # a and b each wrong on a different half of every case (hesitantly), right on the other (confidently):
    # their average is right everywhere; c is confidently wrong on 30% of the voxels
    half = np.zeros((6, 6, 6), bool)
    half[:3] = True

    def mixed(ref, wrong_where):
        right, wrong = _onehot(ref, confidence=0.95), _onehot((ref + 1) % 3, confidence=0.6)
        return np.where(wrong_where[None], wrong, right)

    probs = {}
    for cid, ref in refs.items():
        probs[("a", cid)] = mixed(ref, half)
        probs[("b", cid)] = mixed(ref, ~half)
        probs[("c", cid)] = _onehot(noisy(ref, 0.3, 1), confidence=0.95)
        probs[("good", cid)] = _onehot(noisy(ref, 0.1, 2), confidence=0.9)
    scores = score_candidates(["a", "b", "c"], list(refs), lambda c, i: probs[(c, i)], refs.__getitem__, [0, 1, 2])
    assert set(scores) == {"a", "b", "c", "a+b", "a+c", "b+c"}
    assert scores["a+b"] == pytest.approx(1.0) and scores["c"] < 1.0 and scores["a"] < 0.7
    assert find_best_configuration(scores) == ("a", "b")
    # a configuration right on 90% beats a confidently wrong partner and the pair of them
    only = score_candidates(["c", "good"], list(refs), lambda c, i: probs[(c, i)], refs.__getitem__, [0, 1, 2])
    assert only["good"] > max(only["c+good"], only["c"])
    assert find_best_configuration(only) == ("good",)
    # ties go to fewer members; NaN never wins
    assert find_best_configuration({"x": 0.8, "x+y": 0.8, "y": float("nan")}) == ("x",)
    with pytest.raises(ValueError):
        find_best_configuration({"x": float("nan")})


def test_class_dice_leaves_out_the_ignore_label_and_is_nan_for_two_empty_masks():
    from medseg.training.find_best import class_dice

    ref = np.array([1, 1, 0, 9, 9])
    pred = np.array([1, 0, 0, 1, 2])
    d = class_dice(pred, ref, [1, 2], ignore=9)
    assert d[1] == pytest.approx(2 / 3) and np.isnan(d[2])


# ---------------------------------------------------------------------------------------------- 3d_lowres
@pytest.fixture(scope="module")
def lowres_run(tmp_path_factory):
    """A demo set planned for a small GPU budget (--gpu-memory 0.02 GB: the 3d_fullres patch covers 3% of the
    median image, so 3d_lowres is planned), cross-validated on fold 0 with no configuration named."""
    import medseg.training.recipe as recipe
    from medseg.data.demo import make_demo_dataset
    from medseg.data.manifest import load_manifest
    from medseg.planning import fingerprint, make_plan, save_plan
    from medseg.training.config import load_pipeline
    from medseg.training.crossval import run_crossval

    tmp = tmp_path_factory.mktemp("lowres")
    data = make_demo_dataset(tmp / "data", n_cases=8, seed=1)
    plan = make_plan(fingerprint(load_manifest(data)), device="cuda", memory_gb=0.02, memory_model="analytic")
    assert list(plan.configurations) == ["3d_fullres", "3d_lowres", "3d_cascade_fullres", "2d"], \
        plan.explain["configurations"]
    save_plan(plan, tmp / "plan.json")
    original = recipe.train_recipe
    recipe.train_recipe = lambda d, m: ({**original(d, m)[0], "batches_per_epoch": 2, "threads": 1},
                                        original(d, m)[1])
    try:
        pipeline = load_pipeline(None, {"dataset": str(data), "output": str(tmp / "run"), "plan": str(tmp / "plan.json"),
                                        "train": {"epochs": 1, "device": "cpu", "max_minutes": 3}})
        summary = run_crossval(pipeline, [0], device="cpu")
    finally:
        recipe.train_recipe = original
    return tmp / "run", data, summary


@pytest.mark.slow  # the 3d_lowres fixture trains two configurations: minutes on 2 cores
def test_crossval_trains_every_planned_configuration_and_records_the_choice(lowres_run):
    import yaml

    from medseg.errors import InputError
    from medseg.planning import load_model_record
    from medseg.planning.selection import load_selection

    run, _, summary = lowres_run
    names = ["3d_fullres", "3d_lowres"]  # the plan's 3D configurations (no cascade: fold 0 only); 2d only when named
    for name in names:
        sub = run / name
        assert (sub / "fold_0" / "checkpoint_best.pt").is_file(), name
        assert load_model_record(sub).configuration == name
        cfg = yaml.safe_load((sub / "config.yaml").read_text())
        assert cfg["configuration"] == name and cfg["train"]["max_minutes"] == pytest.approx(1.5)  # 3 min / 2
        assert list((sub / "fold_0" / "validation").glob("*_probabilities.npz"))
    assert not (run / "2d").exists()
    sel = load_selection(run)
    assert sel is not None and sel.members == names
    assert set(sel.candidates) == {"3d_fullres", "3d_lowres", "3d_fullres+3d_lowres"}
    best = max(sel.candidates.values())
    assert sel.candidates["+".join(sel.chosen)] == best
    assert sel.budget["minutes"] == {n: pytest.approx(1.5) for n in names} and "equally" in sel.budget["rule"]
    on_disk = json.loads((run / "crossval_summary.json").read_text())
    assert on_disk["chosen"] == "+".join(sel.chosen) and set(on_disk["configurations"]) == set(names)
    assert summary["selection"]["chosen"] == sel.chosen
    with pytest.raises(InputError, match="selection record"):
        load_model_record(run)


@pytest.mark.slow  # the 3d_lowres fixture trains two configurations: minutes on 2 cores
def test_predictor_follows_the_selection_record(lowres_run):
    from medseg.inference import Predictor
    from medseg.inference.ensemble import EnsemblePredictor
    from medseg.planning.selection import load_selection, write_selection
    from medseg.transforms.case import load_case

    run, data, _ = lowres_run
    sel = load_selection(run)
    assert sel is not None
    image, _ = load_case(sorted((data / "imagesTr").glob("demo_000*")))
    members = {n: Predictor.from_run(run / n, device="cpu", postprocess=False, amp="fp32")
               for n in ("3d_fullres", "3d_lowres")}
    probs = {n: p.predict_full(image, probabilities=True).probabilities.array for n, p in members.items()}
    try:
        for chosen in (["3d_lowres"], ["3d_fullres", "3d_lowres"]):
            sel.chosen = chosen
            write_selection(run, sel)
            pred = Predictor.from_run(run, device="cpu", postprocess=False, amp="fp32")
            full = pred.predict_full(image, probabilities=True)
            if len(chosen) == 1:  # one configuration: its own Predictor, exactly
                assert isinstance(pred, Predictor) and pred.config_name == "3d_lowres"
                np.testing.assert_allclose(full.probabilities.array, probs["3d_lowres"], atol=1e-6)
                continue
            assert isinstance(pred, EnsemblePredictor) and pred.config_name == "3d_fullres+3d_lowres"
            mean = (probs["3d_fullres"] + probs["3d_lowres"]) / 2
            np.testing.assert_allclose(full.probabilities.array, mean, atol=1e-6)
            values = np.asarray(pred.label_values)
            np.testing.assert_array_equal(full.label.array[0], values[np.argmax(mean, axis=0)])
            assert full.label.same_geometry(image)
            # neither member alone gives this map (both really count)
            assert all(not np.array_equal(full.probabilities.array, p) for p in probs.values())
    finally:
        sel.chosen = json.loads((run / "crossval_summary.json").read_text())["selection"]["chosen"]
        write_selection(run, sel)


@pytest.mark.slow  # the 3d_lowres fixture trains two configurations: minutes on 2 cores
def test_export_model_packages_the_chosen_configuration(lowres_run, tmp_path, monkeypatch):
    import zipfile

    from medseg.cli.main import main
    from medseg.planning.selection import load_selection, write_selection

    run, _, _ = lowres_run
    monkeypatch.setenv("MEDSEG_MODELS", str(tmp_path / "models"))
    sel = load_selection(run)
    try:
        sel.chosen = ["3d_lowres"]
        write_selection(run, sel)
        assert main(["-q", "export-model", str(run), "-o", str(tmp_path / "m.zip")]) == 0
        with zipfile.ZipFile(tmp_path / "m.zip") as zf:
            record = json.loads(zf.read("model.json"))
        assert record["configuration"] == "3d_lowres"
        sel.chosen = ["3d_fullres", "3d_lowres"]  # an ensemble of two is no single package: said in one line
        write_selection(run, sel)
        assert main(["-q", "export-model", str(run), "-o", str(tmp_path / "pair.zip")]) != 0
        assert not (tmp_path / "pair.zip").exists()
    finally:
        sel.chosen = json.loads((run / "crossval_summary.json").read_text())["selection"]["chosen"]
        write_selection(run, sel)


# ---------------------------------------------------------------------------------------------- no YAML
@pytest.mark.parametrize("variant", ["ct", "ct_unnamed"])
def test_ct_is_planned_with_and_without_the_modality_name(tmp_path, variant):
    from medseg.data.demo import make_demo_dataset
    from medseg.data.manifest import load_manifest
    from medseg.planning import fingerprint, make_plan

    data = make_demo_dataset(tmp_path / "data", n_cases=3, seed=0, variant=variant)
    assert ("modality" in json.loads((data / "dataset.json").read_text())) == (variant == "ct")
    plan = make_plan(fingerprint(load_manifest(data)))
    assert plan.normalization[0].scheme == "ct"
    assert ("no modality given" in plan.explain["normalization[0]"]) == (variant == "ct_unnamed")


@pytest.mark.parametrize("variant", ["anisotropic", "ct_unnamed"])
def test_crossval_without_yaml_on_the_synthetic_sets(tmp_path, variant, short_recipe):
    from medseg.cli.main import main
    from medseg.data.demo import make_demo_dataset
    from medseg.planning import load_plan

    data = make_demo_dataset(tmp_path / "data", n_cases=8, seed=0, variant=variant)
    run = tmp_path / "run"
    assert main(["-q", "crossval", "--dataset", str(data), "--epochs", "1", "--folds", "0", "--output", str(run),
                 "--no-progress", "--device", "cpu"]) == 0
    plan = load_plan(run / "plan.json")
    full = plan.configurations["3d_fullres"]
    if variant == "anisotropic":  # the 4 mm axis stays coarse, with no early pooling or 3-wide kernel along it
        assert full.spacing[2] == pytest.approx(4.0, rel=0.01) and full.spacing[0] == pytest.approx(0.7, rel=0.01)
        assert full.network.kwargs["kernel_sizes"][0][2] == 1
        assert plan.normalization[0].scheme == "zscore"
    else:  # CT from dataset.json's modality, or from the HU-like intensities when it names none
        assert plan.normalization[0].scheme == "ct"
        assert ("no modality given" in plan.explain["normalization[0]"]) == (variant == "ct_unnamed")
    record = json.loads((run / "model.json").read_text())
    assert "3d_lowres" not in plan.configurations  # one 3D configuration: the ordinary run folder, no selection
    assert record.get("kind") != "selection" and record["configuration"] == "3d_fullres"
    assert (run / "crossval_summary.json").is_file() and (run / "fold_0" / "checkpoint_best.pt").is_file()


def test_train_without_yaml_trains_fold_k(tmp_path, short_recipe):
    from medseg.cli.main import main
    from medseg.data.demo import make_demo_dataset
    from medseg.training.fold import fold_is_finished

    # `medseg train --dataset DIR --fold K`: the demo plan (3d_fullres, 2d) trains its one 3D configuration in the
    # ordinary single-configuration run folder
    data = make_demo_dataset(tmp_path / "data", n_cases=8, seed=0)
    single = tmp_path / "single"
    assert main(["-q", "train", "--dataset", str(data), "--fold", "0", "--output", str(single), "--no-progress",
                 "--device", "cpu", "--epochs", "1"]) == 0
    assert fold_is_finished(single / "fold_0") and not (single / "2d").exists()
    assert json.loads((single / "model.json").read_text())["configuration"] == "3d_fullres"


@pytest.mark.slow
def test_train_without_yaml_trains_fold_k_of_each_3d_configuration(tmp_path, short_recipe, lowres_run):
    """A plan with 3d_lowres: fold K of each 3D configuration, a provisional selection until crossval scores them."""
    from medseg.cli.main import main
    from medseg.inference import Predictor
    from medseg.planning.selection import load_selection
    from medseg.training.fold import fold_is_finished

    _, lowres_data, _ = lowres_run
    run = tmp_path / "run"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"dataset: {lowres_data}\noutput: {run}\nplan: {lowres_run[0] / 'plan.json'}\n"
                   "configuration: auto\ntrain: {epochs: 1, batches_per_epoch: 2, max_minutes: 1, threads: 1, "
                   "val_max_cases: 1}\n")
    assert main(["-q", "train", "--config", str(cfg), "--fold", "0", "--no-progress", "--device", "cpu"]) == 0
    for name in ("3d_fullres", "3d_lowres"):
        assert fold_is_finished(run / name / "fold_0"), name
    sel = load_selection(run)
    assert sel is not None and sel.chosen == ["3d_fullres"] and not sel.candidates and "provisional" in sel.rule
    pred = Predictor.from_run(run, device="cpu")
    assert isinstance(pred, Predictor) and pred.config_name == "3d_fullres" and pred.folds == [0]


@pytest.mark.slow
def test_crossval_with_exactly_the_issue_flags_on_the_demo_set(tmp_path):
    """`medseg crossval --dataset DIR --epochs 1 --folds 0`, nothing else (the CPU recipe's 20-minute default
    budget; one epoch of 100 batches per configuration: minutes on 2 cores)."""
    from medseg.data.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", n_cases=8, seed=0)
    proc = subprocess.run([sys.executable, "-m", "medseg.cli.main", "crossval", "--dataset", str(data), "--epochs",
                           "1", "--folds", "0"], capture_output=True, text=True, timeout=1800, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "runs" / "data"
    record = json.loads((run / "model.json").read_text())
    # the demo plan on a CPU lists 3d_fullres and 2d: auto trains the one 3D configuration, an ordinary run folder
    assert "kind" not in record and record["configuration"] == "3d_fullres" and record["folds"] == [0]
    assert "out-of-fold mean foreground Dice" in proc.stdout
