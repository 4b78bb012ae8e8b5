"""Pipelined prediction: ``medseg predict --workers 1`` (one case after the other) against ``--workers 2 | 3``.

    .venv/bin/python benchmarks/bench_pipeline.py --run runs/hippocampus_3d [--cases 40] [--workers 1 2 3] \\
        [--rounds 3] [--device cpu]

Each row runs ``medseg predict`` as a user would (a fresh process: start-up, model loading, reading,
preprocessing, sliding windows with the run's mirroring, restoring onto the input grid, writing) on the first
``--cases`` validation cases of fold 0 of the run (symbolic links to the shared hippocampus images). Rounds are
interleaved (every setting once per round, the order rotated each round), because the machine may be shared:
the table gives the median wall time and the spread (min-max) over the rounds, the throughput relative to
``--workers 1`` (ratio of the medians), and the peak RSS of the process (``/usr/bin/time``). Every setting's
masks are compared voxel for voxel with those of ``--workers 1``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_helpers import SHARED_DATA, environment, medseg_cmd, medseg_env, validation_inputs


def _timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of ``cmd``."""
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB=%M", *cmd], capture_output=True, text=True,
                         env=medseg_env())
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"exited {res.returncode}: {' | '.join(res.stderr.splitlines()[-3:])}")
    rss = [float(ln.split("=")[1]) / 1024 for ln in res.stderr.splitlines() if ln.startswith("MAXRSS_KB=")]
    return dt, rss[-1] if rss else float("nan")


def _masks(folder: Path, cases: list[str]) -> list[np.ndarray]:
    import nibabel as nib

    return [np.asarray(nib.load(folder / f"{c}.nii.gz").dataobj) for c in cases]


def stage_shares(run: Path, folder: Path, device: str) -> dict[str, float]:
    """Seconds spent in each stage (read, network, write) when the cases run one after the other, in-process."""
    from medseg.inference import Predictor
    from medseg.inference.batch import _CaseStages, discover_cases, predict_cases

    spent = {"read": 0.0, "infer": 0.0, "write": 0.0}

    def timed(name, fn):
        def wrapper(self, x):
            t0 = time.perf_counter()
            try:
                return fn(self, x)
            finally:
                spent[name] += time.perf_counter() - t0
        return wrapper

    originals = {k: getattr(_CaseStages, k) for k in spent}
    for k, fn in originals.items():
        setattr(_CaseStages, k, timed(k, fn))
    try:
        with tempfile.TemporaryDirectory() as out:
            predict_cases(Predictor.from_run(run, device=device), discover_cases(folder), out, workers=1)
    finally:
        for k, fn in originals.items():
            setattr(_CaseStages, k, fn)
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path, help="a trained hippocampus run folder")
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "hippocampus")
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if 1 not in args.workers:
        args.workers = [1, *args.workers]
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        tmp = Path(tmp)
        cases = validation_inputs(args.run, args.data, args.cases, tmp / "in")
        times: dict[int, list[float]] = {w: [] for w in args.workers}
        rss: dict[int, list[float]] = {w: [] for w in args.workers}
        same: dict[int, bool] = {}
        reference = None
        for r in range(args.rounds):
            k = r % len(args.workers)
            for w in args.workers[k:] + args.workers[:k]:
                out = tmp / f"out_{w}_{r}"
                dt, mb = _timed(medseg_cmd("predict", "-i", str(tmp / "in"), "-o", str(out), "-m", str(args.run),
                                           "--device", args.device, "--workers", str(w)))
                times[w].append(dt)
                rss[w].append(mb)
                print(f"round {r}: --workers {w}: {dt:.1f} s, peak RSS {mb:.0f} MB", flush=True)
                masks = _masks(out, cases)
                if w == 1 and reference is None:
                    reference = masks
                elif reference is not None:
                    ok = all(np.array_equal(a, b) for a, b in zip(masks, reference))
                    same[w] = same.get(w, True) and ok
        base_t, base_rss = statistics.median(times[1]), statistics.median(rss[1])
        import torch

        env = environment(args.device)
        print(f"\n{len(cases)} cases, {args.rounds} interleaved rounds, device {args.device}, "
              f"{env.get('cpu_cores')} cores, torch threads {torch.get_num_threads()}, CPU {env.get('cpu', '?')}, "
              f"medseg {env.get('git_revision')}")
        print("| --workers | wall s (median) | min-max | cases/s | throughput vs 1 | peak RSS MB | RSS vs 1 | "
              "masks = --workers 1 |")
        print("|---|---|---|---|---|---|---|---|")
        for w in args.workers:
            t, m = statistics.median(times[w]), statistics.median(rss[w])
            print(f"| {w} | {t:.1f} | {min(times[w]):.1f}-{max(times[w]):.1f} | {len(cases) / t:.2f} | "
                  f"{base_t / t:.2f}x | {m:.0f} | {m / base_rss:.2f}x | "
                  f"{'reference' if w == 1 else ('yes' if same.get(w) else 'NO')} |")
        spent = stage_shares(args.run, tmp / "in", args.device)
        total = sum(spent.values())
        print("\nin-process, one case after the other: " + ", ".join(
            f"{k} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in spent.items())
            + f"; a pipeline can at best hide read + write: {total / max(spent.values()):.2f}x")


if __name__ == "__main__":
    main()
