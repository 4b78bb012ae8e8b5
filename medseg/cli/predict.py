"""`medseg predict -i IN -o OUT -m MODEL_DIR`: batch-safe segmentation of NIfTI files, case folders and DICOM series.

A thin layer over :class:`medseg.inference.Predictor` and :mod:`medseg.inference.batch`: resumable (cases with
outputs are skipped unless ``--overwrite``), shardable (``--shard I/N``), atomic writes, one line per failed case,
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
    p.add_argument("-i", "--input", required=True, metavar="IN", help="input file or folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("-m", "--model", required=True, metavar="MODEL",
                   help="run folder (medseg crossval/train), model package .zip, or installed model name")
    p.add_argument("--folds", type=int, nargs="+", metavar="K", help="folds to ensemble (default: all of the run)")
    p.add_argument("--no-tta", action="store_true", help="no test-time mirroring (faster)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default from the plan)")
    p.add_argument("--amp", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="mixed precision (auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32)")
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
    p.add_argument("--output-format", default="nifti", choices=("nifti", "dicom-seg"),
                   help="mask format (dicom-seg references the source DICOM series)")
    p.add_argument("--overwrite", action="store_true", help="predict cases whose outputs already exist")
    p.add_argument("--shard", metavar="I/N", help="only cases I, I+N, ... of the sorted list (0 <= I < N)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Run ``medseg predict``; returns 1 when any case failed."""
    from tqdm import tqdm

    from medseg.deploy.onnx_runtime import load_predictor
    from medseg.inference.batch import discover_cases, parse_shard, predict_cases, shard_cases, write_report

    t0 = time.perf_counter()
    shard = parse_shard(args.shard)
    predictor = load_predictor(args.model, runtime=args.runtime, precision=args.precision or args.amp,
                               folds=args.folds, device=args.device, tta=not args.no_tta, overlap=args.overlap,
                               batch_size=args.batch_size, postprocess=not args.no_postprocessing,
                               compile=args.compile)
    cases = shard_cases(discover_cases(args.input, int(predictor.plan["in_channels"])), shard)
    bar = tqdm(total=len(cases), unit="case", desc="predict", file=sys.stderr, disable=None)

    def on_case(res) -> None:
        bar.update(1)
        if res.status == "failed":
            bar.write(f"medseg predict: {res.case_id}: FAILED: {res.error}", file=sys.stderr)

    try:
        results = predict_cases(predictor, cases, args.output, output_format=args.output_format,
                                probabilities=args.save_probabilities, uncertainty=args.uncertainty,
                                overwrite=args.overwrite, on_case=on_case)
    finally:
        bar.close()
    info = {"model_dir": str(args.model), "folds": getattr(predictor, "folds", None),
            "configuration": predictor.config_name, "input": str(args.input), "device": str(predictor.device),
            "runtime": getattr(predictor, "runtime", "torch"),
            "tta": not args.no_tta, "overlap": args.overlap, "compile": args.compile, "output_format": args.output_format,
            "shard": args.shard, "seconds": round(time.perf_counter() - t0, 2)}
    report = write_report(args.output, results, info, shard)
    n = {s: sum(r.status == s for r in results) for s in ("written", "skipped", "failed")}
    print(f"medseg predict: {n['written']} written, {n['skipped']} already done, {n['failed']} failed; "
          f"masks in {args.output} (report: {report})")
    return 1 if n["failed"] else 0
