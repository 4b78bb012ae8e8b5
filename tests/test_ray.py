"""The Ray Data recipe (medseg.inference.ray) on a local Ray instance: the masks of the sequential batch runner."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="ray not installed: pip install medseg[ray]")
pytest.importorskip("ray.data", reason="ray[data] not installed: pip install medseg[ray]")

from test_pipeline import save_run  # noqa: E402
from test_predict import synthetic_case  # noqa: E402

from medseg.inference.batch import discover_cases, predict_cases  # noqa: E402
from medseg.inference.ray import predict_with_ray  # noqa: E402
from medseg.io.atomic import TMP_MARKER  # noqa: E402
from medseg.io.nifti import write_nifti  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_recipe_writes_the_sequential_masks(local_ray, tmp_path):
    from medseg.deploy.onnx_runtime import load_predictor

    run = save_run(tmp_path / "run")
    inp = tmp_path / "in"
    for i, shape in enumerate([(28, 24, 14), (26, 22, 12), (24, 26, 16)]):
        write_nifti(synthetic_case(80 + i, shape=shape)[0], inp / f"r{i}.nii.gz")
    (inp / "r_corrupt.nii.gz").write_bytes(b"\x1f\x8b not a gzip stream")
    cases = discover_cases(inp)
    results = predict_with_ray(cases, run, tmp_path / "ray_out", actors=2, device="cpu", tta=False)
    seq = predict_cases(load_predictor(run, device="cpu", tta=False), cases, tmp_path / "seq_out")
    assert [(r.case_id, r.status) for r in results] == [(r.case_id, r.status) for r in seq]
    assert [r.status for r in results] == ["written"] * 3 + ["failed"]
    assert "r_corrupt" in results[-1].error or "gzip" in results[-1].error.lower()
    for i in range(3):
        a = nib.load(tmp_path / "ray_out" / f"r{i}.nii.gz")
        b = nib.load(tmp_path / "seq_out" / f"r{i}.nii.gz")
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        np.testing.assert_array_equal(a.affine, b.affine)
    assert not [p for p in (tmp_path / "ray_out").iterdir() if p.name.startswith(TMP_MARKER)]
