"""Static INT8 quantisation of an exported fold with ONNX Runtime's quantiser, calibrated on training cases.

Calibration windows are the sliding-window engine's own windows (patch size, 50% overlap, mirrored at the
border) of preprocessed training cases of the fold (``splits.json``), so the activation ranges are those the
model sees at prediction time. The quantised model is QDQ (per-channel INT8 weights, INT8 activations), which
ONNX Runtime's CPU provider runs with integer convolutions where the CPU has VNNI/AVX2 integer paths.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medseg.deploy.runfolder import RunFolder
from medseg.errors import InputError

__all__ = ["calibration_windows", "quantize_fold", "quantize_onnx"]

log = logging.getLogger(__name__)


def calibration_windows(run: RunFolder, fold: int, n_cases: int = 8, max_windows: int = 64,
                        seed: int = 0) -> list[np.ndarray]:
    """Windows ``(C, *patch)`` float32 of the fold's training cases, in plan space.

    Raises:
        InputError: the training data set recorded in config.yaml is absent on this machine.
    """
    from medseg.data.manifest import load_manifest
    from medseg.inference.sliding_window import mirror_indices, window_starts
    from medseg.transforms.case import load_case
    from medseg.transforms.preprocess import preprocess_volume

    ds = run.training_dataset
    if ds is None:
        raise InputError(run.root / "config.yaml", f"names a training data set that is absent here "
                         f"({run.config.get('dataset')!r})", "the run's data set on this machine for INT8 calibration")
    conf = run.config
    manifest = load_manifest(ds, patient_regex=conf.get("patient_regex"), file_ending=conf.get("file_ending"))
    splits = run.splits
    train = splits[fold]["train"] if fold < len(splits) else [c.case_id for c in manifest.cases]
    rng = np.random.default_rng([seed, fold])
    chosen = sorted(rng.choice(len(train), size=min(n_cases, len(train)), replace=False).tolist())
    plan, cfg_name = run.plan, run.configuration
    patch = [int(p) for p in plan["configurations"][cfg_name]["patch_size"]]
    windows: list[np.ndarray] = []
    for i in chosen:
        case = manifest.case(train[i])
        image, _ = load_case(case.images)
        arr, _, _ = preprocess_volume(image, plan, cfg_name)
        spatial = arr.shape[1:]
        starts = [window_starts(max(s, p), p, 0.5) for s, p in zip(spatial, patch)]
        for pos in np.stack(np.meshgrid(*starts, indexing="ij"), -1).reshape(-1, len(patch)):
            idx = [mirror_indices(int(a) - max(p - s, 0) // 2, int(a) - max(p - s, 0) // 2 + p, s)
                   for a, p, s in zip(pos, patch, spatial)]
            windows.append(arr[np.ix_(range(arr.shape[0]), *idx)].astype(np.float32))
    if len(windows) > max_windows:
        keep = rng.choice(len(windows), size=max_windows, replace=False)
        windows = [windows[k] for k in sorted(keep)]
    return windows


def quantize_onnx(fp32_path: str | Path, int8_path: str | Path, windows: list[np.ndarray],
                  batch_size: int = 4) -> None:
    """Quantise an fp32 ONNX model statically (QDQ, per-channel INT8 weights) on calibration windows."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from medseg.io.atomic import atomic_path

    batch_size = max(1, min(batch_size, len(windows)))
    windows = windows[: len(windows) // batch_size * batch_size]  # equal batches (the percentile collector stacks them)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{"image": np.stack(windows[i:i + batch_size])}
                                  for i in range(0, len(windows), batch_size)])

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory(prefix="medseg-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        import onnx

        graph = onnx.load(str(pre)).graph
        outputs = {o.name for o in graph.output}
        # the logits layer stays float: it is one small convolution, and its rounding moves argmax boundaries most
        last = [n.name for n in graph.node if outputs & set(n.output)]
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantiser logs a warning per rank-1 weight (norm scales) on the root logger
        try:
            with atomic_path(int8_path) as out:
                quantize_static(str(pre), str(out), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.Percentile, nodes_to_exclude=last,
                                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        finally:
            root.setLevel(level)


def quantize_fold(run: RunFolder, fold: int, fp32_path: Path, int8_path: Path, *, n_cases: int = 8) -> dict[str, Any]:
    """Calibrate on fold ``fold``'s training cases and write ``int8_path``; returns what was done."""
    windows = calibration_windows(run, fold, n_cases=n_cases)
    n_cases = min(n_cases, len(run.splits[fold]["train"]) if fold < len(run.splits) else n_cases)
    quantize_onnx(fp32_path, int8_path, windows)
    log.info("fold %d: INT8 model %s calibrated on %d windows", fold, int8_path.name, len(windows))
    return {"path": Path(int8_path).name, "calibration_windows": len(windows), "calibration_cases": n_cases,
            "method": "onnxruntime quantize_static QDQ, per-channel int8 weights, int8 activations, percentile calibration, float logits layer"}
