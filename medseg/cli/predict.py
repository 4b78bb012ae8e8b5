"""`medseg predict -i IN -o OUT -m MODEL_DIR`: batch-safe segmentation of NIfTI files, case folders and DICOM series.

A thin layer over :class:`medseg.inference.Predictor` and :mod:`medseg.inference.batch`: resumable (cases with
outputs are skipped unless ``--overwrite``), shardable (``--shard I/N`` or ``auto``; ``--merge-reports OUT``
collects the shards' reports), pipelined (``--workers N``), atomic writes, one line per failed case,
``OUT/predict_report.json``, exit code 1 when any case failed.
"""

from __future__ import annotations

import argparse
import sys
import time


def register(subparsers) -> None:
    """Add the ``predict`` subcommand."""
    p = subparsers.add_parser(
        "predict", help="segment images with a trained model folder (NIfTI, case folders, DICOM series)",
        description="Predict label maps with the folds of a run folder. IN is a NIfTI/NRRD/MHA file, a folder of "
                    "cases (one file per case, or nnU-Net CASE_0000.nii.gz channel files), a DICOM series folder or "
                    "a folder of DICOM series folders. Masks are written as OUT/CASE.nii.gz with the input's exact "
                    "geometry. Cases already done are skipped (rerun after an interruption to resume).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-i", "--input", metavar="IN", help="input file or folder (required unless --merge-reports)")
    p.add_argument("-o", "--output", metavar="OUT", help="output folder (required unless --merge-reports)")
    p.add_argument("-m", "--model", metavar="MODEL",
                   help="run folder (medseg crossval/train), model package .zip, or installed model name "
                        "(required unless --merge-reports)")
    p.add_argument("--folds", type=int, nargs="+", metavar="K", help="folds to ensemble (default: all of the run)")
    p.add_argument("--no-tta", action="store_true", help="no test-time mirroring (faster)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default from the plan)")
    p.add_argument("--amp", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="mixed precision (auto: bf16 on CUDA devices that support it, else fp16; bf16 on CPUs with native bf16, else fp32)")
    p.add_argument("--runtime", default="torch", choices=("torch", "onnxruntime"),
                   help="network runtime inside the sliding-window engine")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16", "int8"),
                   help="overrides --amp; int8 (CPU) needs --runtime onnxruntime")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each fold's network once (faster full window batches on large volumes; "
                        "not for small crops)")
    p.add_argument("--save-probabilities", action="store_true", help="also write CASE_probabilities.nii.gz")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write CASE_uncertainty.nii.gz (predictive entropy over mirrors and folds)")
    p.add_argument("--no-postprocessing", action="store_true", help="ignore the run's postprocessing.json")
    p.add_argument("--output-format", default="nifti", choices=("nifti", "nifti-multilabel", "dicom-seg", "rtstruct"),
                   help="mask format: dicom-seg (CASE.dcm) and rtstruct (CASE_rtstruct.dcm, contours) reference the "
                        "source DICOM series, with segment/ROI names from the model's labels; nifti-multilabel "
                        "(CASE.nii.gz) is a 4D uint8 NIfTI with one channel per region (per foreground class "
                        "without regions), for overlapping structures")
    p.add_argument("--strict-geometry", action="store_true",
                   help="fail gantry-tilted or unevenly spaced DICOM series (default: resample them onto a regular "
                        "grid with a warning; the mask then lies on that grid)")
    p.add_argument("--overwrite", action="store_true", help="predict cases whose outputs already exist")
    p.add_argument("--shard", metavar="I/N|auto",
                   help="only cases I, I+N, ... of the sorted list (0 <= I < N); auto: I/N from a SLURM job array "
                        "(SLURM_ARRAY_TASK_ID, _MIN, _COUNT) or torchrun (RANK, WORLD_SIZE), else no sharding")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="helper threads around the network: N >= 2 reads and preprocesses the next cases and "
                        "restores and writes the previous ones while the network predicts (same masks); 1: one case "
                        "after the other (default: 2 on a CUDA device when there is more than one case, else 1)")
    p.add_argument("--merge-reports", metavar="OUT",
                   help="only merge OUT's per-shard reports (predict_report.shard-I-of-N.json, every I of one N) "
                        "into OUT/predict_report.json and exit (no -i/-o/-m)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Run ``medseg predict``; returns 1 when any case failed (or the report could not be written)."""
    from pathlib import Path

    from tqdm import tqdm

    from medseg.deploy.onnx_runtime import load_predictor
    from medseg.errors import ConfigError, MedsegError
    from medseg.inference.batch import (
        ReportWriter,
        _report_size,
        account_inputs,
        discover_inputs,
        predict_cases,
        prepare_output,
        shard_cases,
        write_report,
    )
    from medseg.inference.discovery import resolve_shard

    t0 = time.perf_counter()
    if args.merge_reports:
        from medseg.inference.shard_reports import merge_reports

        path = merge_reports(args.merge_reports)
        print(f"medseg predict: merged the shard reports into {path}")
        return 0
    missing = [flag for flag, value in (("-i", args.input), ("-o", args.output), ("-m", args.model)) if not value]
    if missing:
        raise ConfigError(" ".join(missing), None, "-i IN -o OUT -m MODEL (only --merge-reports OUT goes without)")
    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers", args.workers, "1 (one case after the other) or more (pipelined)")
    shard, shard_source = resolve_shard(args.shard)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        prepare_output(out)  # refuses an existing file before the model is loaded
    predictor = load_predictor(args.model, runtime=args.runtime, precision=args.precision or args.amp,
                               folds=args.folds, device=args.device, tta=not args.no_tta, overlap=args.overlap,
                               batch_size=args.batch_size, postprocess=not args.no_postprocessing,
                               compile=args.compile)
    discovery = discover_inputs(args.input, predictor.record.in_channels, exclude=[out])
    prepare_output(out, args.input)
    for entry in discovery.skipped():
        print(f"medseg predict: {Path(args.input) / entry.path}: skipped ({entry.reason})", file=sys.stderr)
    cases = shard_cases(discovery.cases, shard)
    # default: pipelined on a GPU, where the network waits for reading and writing; one case after the other on a
    # CPU, where the network already uses every core (docs/benchmarks.md, "Pipelined prediction")
    on_gpu = getattr(predictor.device, "type", str(predictor.device)) == "cuda"
    workers = args.workers if args.workers is not None else (2 if on_gpu and len(cases) > 1 else 1)
    writer = ReportWriter(out, shard, reserve=_report_size(len(cases), len(discovery.entries)))
    bar = tqdm(total=len(cases), unit="case", desc="predict", file=sys.stderr, disable=None)

    def on_case(res) -> None:
        bar.update(1)
        if res.status == "failed":
            bar.write(f"medseg predict: {res.case_id}: FAILED: {res.error}", file=sys.stderr)

    try:
        results = predict_cases(predictor, cases, out, output_format=args.output_format,
                                probabilities=args.save_probabilities, uncertainty=args.uncertainty,
                                overwrite=args.overwrite, on_case=on_case, strict_geometry=args.strict_geometry,
                                workers=workers)
    except BaseException:
        writer.discard()
        raise
    finally:
        bar.close()
    entries = account_inputs(discovery, results, shard)
    info = {"model_dir": str(args.model), "folds": getattr(predictor, "folds", None),
            "configuration": predictor.config_name, "input": str(args.input), "device": str(predictor.device),
            "runtime": getattr(predictor, "runtime", "torch"),
            "tta": not args.no_tta, "overlap": args.overlap, "compile": args.compile, "output_format": args.output_format,
            "shard": None if shard is None else f"{shard[0]}/{shard[1]}", "shard_source": shard_source,
            "workers": workers, "seconds": round(time.perf_counter() - t0, 2)}
    n = {s: sum(r.status == s for r in results) for s in ("written", "skipped", "failed")}
    n_skipped = sum(e.status == "skipped" and e.case_id is None for e in entries)
    summary = (f"medseg predict: {n['written']} written, {n['skipped']} already done, {n['failed']} failed"
               + (f", {n_skipped} input entr{'y' if n_skipped == 1 else 'ies'} skipped" if n_skipped else ""))
    try:
        report = write_report(out, results, info, shard, inputs=entries, writer=writer)
    except MedsegError as exc:
        print(f"{summary}; masks in {args.output}", flush=True)
        print(f"medseg predict: error: {exc}", file=sys.stderr)
        return 1
    print(f"{summary}; masks in {args.output} (report: {report})")
    return 1 if n["failed"] else 0
