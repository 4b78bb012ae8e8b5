"""End to end: ``medseg predict`` vs ``nnUNetv2_predict`` on the same folder of hippocampus cases.

    .venv/bin/python benchmarks/bench_predict.py --medseg-run runs/hippocampus_3d \\
        --nnunet-python /tmp/nnunet-venv/bin/python --nnunet-root /tmp/nnunet_bench [--cases 20]

The nnU-Net side needs ``benchmarks/nnunet_hippocampus.py setup`` and ``train-bench`` first: a results folder
for the plans variant ``nnUNetPlans_medseg``, whose network, patch and batch are medseg's hippocampus plan's.
Both commands run as a user would run them (a fresh process each: start-up, reading, preprocessing, sliding
windows, test-time mirroring, resampling back, writing), on the first ``--cases`` validation cases of fold 0 of
the medseg run (nnU-Net channel naming ``CASE_0000.nii.gz``, symbolic links to the shared data). Printed per
row: wall seconds for the folder, seconds per case, peak RSS of the process tree's largest process, masks
written, whether every mask has its input's affine and shape, and the mean foreground Dice of the masks against
the expert labels (nnU-Net's weights are a few training steps, so its Dice is not a comparison; only time is).

Rows: each tool's defaults (medseg: ``--amp auto``, mirroring over the axes the run trained with; nnU-Net:
float32 on a CPU, mirroring over its three axes), then like for like (the same mirrors; no mirroring; float32).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_helpers import validation_inputs

HERE = Path(__file__).resolve()


def _run_copy(run: Path, mirror_axes: list[int], dst: Path) -> Path:
    """A model folder like ``run`` whose model record mirrors ``mirror_axes`` at test time (fold folders linked)."""
    import dataclasses

    from medseg.planning import load_model_record, write_model_record

    dst.mkdir()
    for p in run.iterdir():
        if p.name.startswith("fold_"):
            (dst / p.name).symlink_to(p.resolve())
        elif p.is_file():
            shutil.copy2(p, dst / p.name)
    record = load_model_record(run)
    write_model_record(dst, dataclasses.replace(record, config=dataclasses.replace(record.config,
                                                                                  mirror_axes=mirror_axes)))
    return dst


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds and peak RSS (MB, largest process of the tree) of ``cmd``; stderr tail on failure."""
    time_bin = shutil.which("time") or "/usr/bin/time"
    full = [time_bin, "-f", "MAXRSS_KB=%M", *cmd] if Path(time_bin).exists() else cmd
    t0 = time.perf_counter()
    res = subprocess.run(full, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    rss = float("nan")
    for line in res.stderr.splitlines():
        if line.startswith("MAXRSS_KB="):
            rss = float(line.split("=")[1]) / 1024
    if res.returncode != 0:
        tail = [ln for ln in res.stderr.splitlines() if not ln.startswith("MAXRSS_KB=")][-3:]
        raise RuntimeError(f"{cmd[0]} exited {res.returncode}: {' | '.join(tail)}")
    return dt, rss, res.stdout


def _check(out: Path, cases: list[str], data: Path) -> tuple[int, bool, float]:
    import nibabel as nib

    written, same, dices = 0, True, []
    for c in cases:
        f = out / f"{c}.nii.gz"
        if not f.is_file():
            same = False
            continue
        written += 1
        m, img = nib.load(str(f)), nib.load(str(data / "imagesTr" / f"{c}.nii.gz"))
        same &= m.shape == img.shape[:3] and np.allclose(m.affine, img.affine, atol=1e-4)
        pred = np.asarray(m.dataobj)
        ref = np.asarray(nib.load(str(data / "labelsTr" / f"{c}.nii.gz")).dataobj)
        for k in (1, 2):
            a, b = pred == k, ref == k
            if a.any() or b.any():
                dices.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    return written, bool(same), float(np.mean(dices)) if dices else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--medseg-run", type=Path, required=True, help="a medseg run folder trained on hippocampus")
    ap.add_argument("--data", type=Path, default=HERE.parents[2] / "shared" / "data" / "hippocampus")
    ap.add_argument("--nnunet-python", default="/tmp/nnunet-venv/bin/python")
    ap.add_argument("--nnunet-root", type=Path, default=Path("/tmp/nnunet_bench"))
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (best wall time per row is kept)")
    ap.add_argument("--rows", nargs="+", default=None, help="subset of the row keys (m0 n0 m3 m3f mn mnf nn)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda, for both tools")
    a = ap.parse_args()
    results = run_rows(a)
    print(f"\n{results[0]['cases'] if results else 0} hippocampus cases (fold-0 validation of {a.medseg_run.name}), "
          f"network features 16-128, patch from the plan, {a.device}, {os.cpu_count()} cores, best of {a.rounds} rounds")
    print(f"{'command':<34}{'precision, mirrors':>20}{'wall s':>8}{'s/case':>8}{'vs nnU-Net':>11}{'peak RSS MB':>12}"
          f"{'masks':>7}{'geometry':>9}{'Dice':>7}")
    for r in results:
        ratio = f"{r['vs_nnunet']:.2f}x" if r["vs_nnunet"] else "-"
        print(f"{r['command']:<34}{r['precision_mirrors']:>20}{r['wall_s']:>8.1f}{r['s_per_case']:>8.2f}{ratio:>11}"
              f"{r['peak_rss_mb']:>12.0f}{r['masks']:>7}{'same' if r['geometry_same'] else 'DIFF':>9}{r['dice']:>7.3f}")
    print("(vs nnU-Net: nnUNetv2_predict's wall time over this row's, at its defaults or with the same mirrors)")


def run_rows(a: argparse.Namespace, log=print) -> list[dict]:
    """Run the rows of ``main`` (options ``a``) in interleaved rounds; one result dict per row that ran."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    cases = validation_inputs(a.medseg_run, a.data, a.cases, tmp / "in")
    from medseg.planning import load_model_record

    trained_axes = load_model_record(a.medseg_run).config.mirror_axes
    run3 = _run_copy(a.medseg_run, [0, 1, 2], tmp / "run_mirror3")
    medseg = [sys.executable, "-m", "medseg.cli.main", "-q", "predict", "-i", str(tmp / "in"), "--device", a.device,
              "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1])}
    nn_bin = Path(a.nnunet_python).parent / "nnUNetv2_predict"
    nn_env = {**os.environ, "nnUNet_raw": str(a.nnunet_root / "raw"),
              "nnUNet_preprocessed": str(a.nnunet_root / "preprocessed"),
              "nnUNet_results": str(a.nnunet_root / "results")}
    nnunet = [str(nn_bin), "-i", str(tmp / "in"), "-d", "4", "-c", "3d_fullres", "-p", "nnUNetPlans_medseg", "-f",
              "0", "-chk", "checkpoint_final.pth", "-device", a.device]
    # (name, precision and mirrors, command, environment, key, key of the nnU-Net row it is compared with)
    rows = [
        ("medseg, defaults", f"auto, {len(trained_axes)} axes", medseg + ["-m", str(a.medseg_run)], env, "m0", "n0"),
        ("nnUNetv2_predict, defaults", "fp32, 3 axes", nnunet, nn_env, "n0", "n0"),
        ("medseg, nnU-Net's mirrors", "auto, 3 axes", medseg + ["-m", str(run3)], env, "m3", "n0"),
        ("medseg, fp32, nnU-Net's mirrors", "fp32, 3 axes", medseg + ["-m", str(run3), "--amp", "fp32"], env, "m3f",
         "n0"),
        ("medseg, no mirroring", "auto, none", medseg + ["-m", str(a.medseg_run), "--no-tta"], env, "mn", "nn"),
        ("medseg, fp32, no mirroring", "fp32, none", medseg + ["-m", str(a.medseg_run), "--no-tta", "--amp", "fp32"],
         env, "mnf", "nn"),
        ("nnUNetv2_predict --disable_tta", "fp32, none", nnunet + ["--disable_tta"], nn_env, "nn", "nn"),
    ]
    if not nn_bin.exists():
        log(f"[skip] nnU-Net rows: {nn_bin} not found")
        rows = [r for r in rows if not r[0].startswith("nnUNet")]
    if a.rows:
        rows = [r for r in rows if r[4] in a.rows]
    best: dict[str, tuple[float, float]] = {}
    for _ in range(a.rounds):
        for name, _, cmd, e, key, _ in rows:
            out = tmp / f"out_{key}"
            shutil.rmtree(out, ignore_errors=True)
            try:
                dt, rss, _ = _timed([*cmd, "-o", str(out)], e)
            except RuntimeError as err:
                log(f"[fail] {name}: {err}")
                continue
            if key not in best or dt < best[key][0]:
                best[key] = (dt, max(rss, best.get(key, (0, 0))[1]))
    results = []
    for name, prec, _, _, key, ref in rows:
        if key not in best:
            continue
        dt, rss = best[key]
        written, same, dice = _check(tmp / f"out_{key}", cases, a.data)
        results.append({"command": name, "precision_mirrors": prec, "wall_s": dt, "s_per_case": dt / len(cases),
                        "vs_nnunet": best[ref][0] / dt if ref in best else None, "peak_rss_mb": rss,
                        "masks": written, "cases": len(cases), "geometry_same": same, "dice": dice, "key": key})
    shutil.rmtree(tmp, ignore_errors=True)
    return results

if __name__ == "__main__":
    main()
