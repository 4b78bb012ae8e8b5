"""Batch prediction on a Ray cluster: a Ray Data recipe (``pip install medseg[ray]``).

The cases become a Ray Dataset; ``map_batches`` hands them to a pool of actors, each holding one
:class:`~medseg.inference.Predictor` (the model is loaded once per actor, not once per case), and each actor runs
:func:`medseg.inference.batch.predict_cases` on its batch: the same checks, atomic writes, skip-if-done and one
result per case as ``medseg predict``. The output folder must be shared by the actors' machines.

Example (a local Ray instance; on a cluster, ``ray.init(address="auto")`` in a job submitted to it)::

    import ray
    from medseg.inference.batch import discover_inputs, write_report
    from medseg.inference.ray import predict_with_ray

    ray.init(num_cpus=8)
    cases = discover_inputs("/data/study/images").cases
    results = predict_with_ray(cases, "runs/hippocampus_3d", "/data/study/masks", actors=4, cpus_per_actor=2)
    write_report("/data/study/masks", results, {"model_dir": "runs/hippocampus_3d", "runner": "ray"})

Ray is imported only when :func:`predict_with_ray` runs, so this module imports without it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError
from medseg.inference.batch import CaseResult
from medseg.inference.discovery import CaseInput

__all__ = ["predict_with_ray", "CaseBatchPredictor"]

log = logging.getLogger(__name__)


def _rows(cases: Sequence[CaseInput]) -> list[dict[str, Any]]:
    return [{"case_id": c.case_id, "images": json.dumps([str(p) for p in c.images]), "kind": c.kind,
             "series_uid": c.series_uid or ""} for c in cases]


class CaseBatchPredictor:
    """The callable class of ``map_batches``: one Predictor per Ray actor, a batch of cases per call.

    Args:
        model: run folder, ``.zip`` package or installed model name (:func:`medseg.deploy.onnx_runtime.load_predictor`).
        out_dir: the output folder (shared by every actor).
        device: ``cpu``, ``cuda``, ``auto``.
        threads: torch intra-op threads of this actor (default: torch's).
        predict_options: keyword arguments of :func:`~medseg.inference.batch.predict_cases` (``output_format``,
            ``probabilities``, ``uncertainty``, ``overwrite``, ``strict_geometry``, ``workers``).
        options: :class:`~medseg.inference.InferenceOptions` fields (``tta``, ``overlap``, ...).
    """

    def __init__(self, model: str, out_dir: str, device: str = "cpu", threads: int | None = None,
                 predict_options: dict[str, Any] | None = None, options: dict[str, Any] | None = None):
        import torch

        from medseg.deploy.onnx_runtime import load_predictor

        if threads:
            torch.set_num_threads(int(threads))
        self.predictor = load_predictor(model, device=device, **(options or {}))
        self.out_dir = out_dir
        self.predict_options = dict(predict_options or {})

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        from medseg.inference.batch import predict_cases

        cases = [CaseInput(str(cid), [Path(p) for p in json.loads(str(images))], str(kind), str(uid) or None)
                 for cid, images, kind, uid in zip(batch["case_id"], batch["images"], batch["kind"],
                                                   batch["series_uid"])]
        results = predict_cases(self.predictor, cases, self.out_dir, **self.predict_options)
        return {"case_id": [r.case_id for r in results], "status": [r.status for r in results],
                "error": [r.error or "" for r in results], "seconds": [r.seconds for r in results],
                "outputs": [json.dumps(r.outputs) for r in results],
                "warnings": [json.dumps(r.warnings) for r in results]}


def predict_with_ray(cases: Sequence[CaseInput], model: str | Path, out_dir: str | Path, *, actors: int = 1,
                     cpus_per_actor: float = 1, gpus_per_actor: float = 0, cases_per_batch: int = 1,
                     device: str = "cpu", predict_options: dict[str, Any] | None = None,
                     **options: Any) -> list[CaseResult]:
    """Predict ``cases`` with a pool of Ray actors (Ray Data ``map_batches``), writing masks into ``out_dir``.

    Ray must be initialised (``ray.init(...)``) or will be started locally by Ray Data on first use.

    Args:
        cases: from :func:`medseg.inference.batch.discover_inputs` (optionally :func:`shard_cases`).
        model: run folder, ``.zip`` package or installed model name; every actor must be able to read it.
        out_dir: output folder on storage every actor writes to (created).
        actors: number of actors, each with its own Predictor.
        cpus_per_actor: Ray CPUs reserved by each actor (also its torch threads).
        gpus_per_actor: Ray GPUs reserved by each actor (use with ``device="cuda"``).
        cases_per_batch: cases handed to an actor at once.
        device: the actors' torch device.
        predict_options: keyword arguments of :func:`~medseg.inference.batch.predict_cases` (``output_format``,
            ``probabilities``, ``uncertainty``, ``overwrite``, ``strict_geometry``, ``workers``).
        **options: :class:`~medseg.inference.InferenceOptions` fields (``tta``, ``overlap``, ``batch_size``, ...).

    Returns:
        One :class:`~medseg.inference.batch.CaseResult` per case, sorted by case id (failures are results, as
        in ``medseg predict``).

    Raises:
        ConfigError: ``actors`` or ``cases_per_batch`` < 1.
        ImportError: Ray is not installed (``pip install medseg[ray]``).
    """
    try:
        import ray.data
    except ImportError as exc:
        raise ImportError("medseg.inference.ray needs Ray Data: pip install 'medseg[ray]'") from exc
    from medseg.inference.batch import prepare_output

    if actors < 1:
        raise ConfigError("actors", actors, "1 or more Ray actors")
    if cases_per_batch < 1:
        raise ConfigError("cases_per_batch", cases_per_batch, "1 or more cases per batch")
    if not cases:
        return []
    prepare_output(out_dir)
    threads = max(1, int(cpus_per_actor))
    blocks = max(1, len(cases) // cases_per_batch)  # one block per batch, so that every actor gets work
    try:
        ds = ray.data.from_items(_rows(cases), override_num_blocks=blocks)
    except TypeError:  # Ray < 2.10 calls it parallelism
        ds = ray.data.from_items(_rows(cases), parallelism=blocks)
    out = ds.map_batches(
        CaseBatchPredictor, batch_size=cases_per_batch, concurrency=actors, num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor, batch_format="numpy",
        fn_constructor_kwargs={"model": str(model), "out_dir": str(out_dir), "device": device, "threads": threads,
                               "predict_options": predict_options, "options": options})
    results = [CaseResult(str(r["case_id"]), str(r["status"]), error=str(r["error"]) or None,
                          seconds=float(r["seconds"]), outputs=json.loads(str(r["outputs"])),
                          warnings=json.loads(str(r["warnings"])))
               for r in out.take_all()]
    log.info("ray: %d cases predicted by %d actor(s)", len(results), actors)
    return sorted(results, key=lambda r: r.case_id)
