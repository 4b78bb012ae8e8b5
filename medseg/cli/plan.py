"""`medseg plan DATASET -o plan.json [--explain] [--json]`: fingerprint a data set and write its plan."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medseg.planning import Plan


def register(subparsers) -> None:
    """Add the ``plan`` subcommand."""
    p = subparsers.add_parser(
        "plan", help="fingerprint a data set and write its plan (spacing, normalisation, patch, batch, network)",
        description="Fingerprint DATASET (spacings, shapes, foreground intensities, class frequencies, modality) "
                    "and turn it into a plan JSON that preprocessing, training and inference read.")
    p.add_argument("dataset", help="data set folder (MSD / nnU-Net layout) or manifest CSV")
    p.add_argument("-o", "--output", default="plan.json", help="plan file to write (default: plan.json)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="size network, patch and batch for this training device (default: cpu)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                   help="GPU memory budget in GB for --device cuda (default: the visible GPU's free memory, "
                        "or 11 without one)")
    p.add_argument("--memory-model", choices=("step", "analytic"), default="step",
                   help="how --device cuda estimates training memory: a simulated training step (default, "
                        "seconds per configuration) or the fast analytic formula")
    p.add_argument("--explain", action="store_true",
                   help="print each choice (spacing, normalisation per channel, patch, batch, topology, mirror axes, "
                        "configurations) with the fact that decided it")
    p.add_argument("--json", action="store_true",
                   help="write the plan JSON to stdout (the summary and messages go to stderr)")
    p.add_argument("--max-cases", type=int, default=None, metavar="N",
                   help="fingerprint at most N cases, evenly spread (default: all)")
    p.set_defaults(func=run)


def format_plan(plan: Plan) -> str:
    """A readable multi-line summary of a plan."""
    fp = plan.fingerprint
    lines = [
        f"data set      {plan.dataset}: {fp.get('num_cases', '?')} cases, {plan.spatial_dims}D, "
        f"{plan.in_channels} channel(s) {fp.get('modalities', '')}",
        "labels        " + ", ".join(f"{k}={v}" + (f" (value {plan.label_values[k]})" if plan.label_values[k] != k
                                                    else "") for k, v in plan.labels.items()),
        f"median spacing {_fmt(fp.get('median_spacing', []), '.3g')} mm, median shape "
        f"{_fmt(fp.get('median_shape', []), '.0f')}",
    ]
    if plan.regions:
        lines.insert(2, "regions       " + ", ".join(f"{r.name}={list(r.values)} (painted {r.paint})"
                                                    for r in plan.regions) + ": one sigmoid output each")
    for c, n in enumerate(plan.normalization):
        extra = {"ct": f" clip [{(n.clip or [0, 0])[0]:.4g}, {(n.clip or [0, 0])[1]:.4g}] mean {n.mean:.4g} "
                       f"std {n.std:.4g}",
                 "zscore_nonzero": " inside nonzero mask", "zscore": " per image"}.get(n.scheme, "")
        lines.append(f"channel {c}     {n.scheme}{extra}")
    lines.append(f"device        {plan.device}" + (f" ({plan.memory_gb:g} GB)" if plan.memory_gb else ""))
    for name, cfg in plan.configurations.items():
        net = cfg.network.kwargs
        sp = ["-" if s is None else f"{s:.3g}" for s in cfg.spacing]
        feats = net.get("features") or ["?"]
        head = name if len(name) < 13 else name + "\n" + " " * 13  # a long name gets its own line
        lines.append(f"{head:<13} spacing {' x '.join(sp)} mm | patch {_fmt(cfg.patch_size, 'd')} | "
                     f"batch {cfg.batch_size} | pools/axis {_fmt(cfg.pools_per_axis, 'd')} | "
                     f"features {feats[0]}-{feats[-1]} ({len(feats)} stages) | mirror {cfg.mirror_axes}"
                     + (f" | slices across axis {cfg.slice_axis}" if cfg.slicewise else "")
                     + (" | acquisition frame" if cfg.frame != "ras" else "")
                     + (f" | + {cfg.previous_stage} prediction as input" if cfg.previous_stage else ""))
    return "\n".join(lines)


def format_explain(plan: Plan) -> str:
    """Each planning choice with the fact that decided it (``plan.explain``), one per line."""
    width = max((len(k) for k in plan.explain), default=0)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in plan.explain.items())


def _fmt(values, spec: str) -> str:
    return " x ".join(format(v, spec) for v in values)


def run(args: argparse.Namespace) -> int:
    """Fingerprint, plan, write, print."""
    from medseg.data.manifest import load_manifest
    from medseg.errors import ConfigError
    from medseg.planning import fingerprint, make_plan, save_plan

    if args.max_cases is not None and args.max_cases < 1:
        raise ConfigError("--max-cases", args.max_cases, "a positive number of cases")
    manifest = load_manifest(args.dataset)
    fp = fingerprint(manifest, max_cases=args.max_cases)
    plan = make_plan(fp, device=args.device, memory_gb=args.gpu_memory, memory_model=args.memory_model)
    save_plan(plan, args.output)
    text = format_plan(plan) + ("\n\nwhy:\n" + format_explain(plan) if args.explain else "")
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        print(text, file=sys.stderr)
        print(f"plan written to {args.output}", file=sys.stderr)
    else:
        print(text)
        print(f"plan written to {args.output}")
    return 0
