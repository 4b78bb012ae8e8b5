"""ONNX Runtime behind the sliding-window engine: a module that stands in ``Predictor.networks``.

``load_predictor(model, runtime="onnxruntime", precision="fp32"|"int8")`` builds the usual torch Predictor
with :meth:`Predictor.from_run` (preprocessing, sliding windows, mirroring, fold averaging, post-processing are
the same code) and replaces each fold's network by an :class:`OnnxNetwork` over that fold's ONNX file: the
package's ``onnx/fold_K[.int8].onnx`` when present, else exported (and, for INT8, calibrated on the run's
training cases) on the fly into memory/a temporary folder.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.errors import ConfigError

__all__ = ["OnnxNetwork", "load_predictor", "RUNTIMES", "PRECISIONS"]

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


class OnnxNetwork(nn.Module):
    """``(B, C, *patch)`` float32 tensor -> logits tensor, computed by an ONNX Runtime session.

    Args:
        model: the ``.onnx`` file or its bytes.
        providers: ONNX Runtime execution providers (default: CUDA when available, then CPU).
        threads: intra-op threads (default: torch's thread count).
    """

    def __init__(self, model: str | Path | bytes, *, providers: list[str] | None = None, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = int(threads or torch.get_num_threads())
        so.inter_op_num_threads = 1
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=so,
                                            providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.providers = self.session.get_providers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        out = self.session.run(None, {self.input_name: arr})[0]
        return torch.from_numpy(out).to(x.device)

    def extra_repr(self) -> str:
        return f"providers={self.providers}"


def _onnx_models(run_dir: Path, folds: list[int], precision: str, threads: int | None) -> list[str | bytes]:
    from medseg.deploy.export import export_run
    from medseg.deploy.runfolder import RunFolder

    run = RunFolder(run_dir)
    paths = [run.onnx_file(f, precision) for f in folds]
    if all(p.is_file() for p in paths):
        return [str(p) for p in paths]
    log.info("no %s ONNX files in %s; exporting%s now", precision, run_dir,
             " and calibrating INT8" if precision == "int8" else "")
    with tempfile.TemporaryDirectory(prefix="medseg-onnx-") as tmp:
        export_run(run_dir, "onnx", Path(tmp), folds=folds, int8=precision == "int8", threads=threads)
        return [(Path(tmp) / p.name).read_bytes() for p in paths]


def load_predictor(model: str | Path, runtime: str = "torch", precision: str = "auto", *,
                   folds: list[int] | None = None, device: str | None = None, threads: int | None = None,
                   **options: Any):
    """A :class:`~medseg.inference.Predictor` running on ``runtime`` at ``precision``.

    Args:
        model: a run folder, a ``.zip`` package or an installed model name (:func:`resolve_model`).
        runtime: ``"torch"`` or ``"onnxruntime"``.
        precision: torch: ``auto|fp32|bf16|fp16`` (autocast); onnxruntime: ``fp32`` (or ``auto``) or
            ``int8`` (CPU, static quantisation).
        folds: folds to ensemble (default: the model's).
        device: torch device for the engine's accumulation (``auto``, ``cpu``, ``cuda``).
        threads: ONNX Runtime intra-op threads (default: torch's).
        **options: other :class:`~medseg.inference.InferenceOptions` fields (``tta``, ``overlap``, ...).

    Returns:
        The Predictor (its ``networks`` are :class:`OnnxNetwork` for ONNX Runtime).

    Raises:
        ConfigError: an unknown runtime or a precision the runtime does not offer.
        InputError: what :func:`resolve_model` and :meth:`Predictor.from_run` raise.
    """
    from medseg.deploy.package import resolve_model
    from medseg.inference import Predictor

    if runtime not in RUNTIMES:
        raise ConfigError("--runtime", runtime, "one of " + ", ".join(RUNTIMES))
    if precision not in PRECISIONS:
        raise ConfigError("--precision", precision, "one of " + ", ".join(PRECISIONS))
    run_dir = resolve_model(model)
    if runtime == "torch":
        if precision == "int8":
            raise ConfigError("--precision", precision, "auto, fp32, bf16 or fp16 with --runtime torch "
                              "(int8 runs with --runtime onnxruntime)")
        return Predictor.from_run(run_dir, folds=folds, device=device, amp=precision, **options)
    if precision in ("bf16", "fp16"):
        raise ConfigError("--precision", precision, "fp32 or int8 with --runtime onnxruntime "
                          "(fp16/bf16 autocast runs with --runtime torch)")
    if options.get("compile"):
        raise ConfigError("--compile", True, "--runtime torch (ONNX Runtime optimises its own graph)")
    prec = "int8" if precision == "int8" else "fp32"
    pred = Predictor.from_run(run_dir, folds=folds, device=device, amp="fp32", **options)
    if prec == "int8" and pred.device.type != "cpu":
        raise ConfigError("--precision", precision, "int8 on --device cpu")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if pred.device.type == "cuda" else ["CPUExecutionProvider"]
    models = _onnx_models(Path(run_dir), list(pred.folds), prec, threads)
    pred.networks = [OnnxNetwork(m, providers=providers, threads=threads) for m in models]
    pred.runtime = f"onnxruntime-{prec}"
    log.info("ONNX Runtime %s on %s", prec, pred.networks[0].providers)
    return pred
