"""Merge the per-shard reports of a sharded ``medseg predict`` into one ``predict_report.json``.

Each shard (``--shard I/N`` or ``--shard auto``) writes ``OUT/predict_report.shard-I-of-N.json``;
:func:`merge_reports` checks that every shard of one N is there and from the same run, then writes
``OUT/predict_report.json`` atomically: summed counts, the cases of every shard sorted by case id, and each input
entry with the status its owning shard gave it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from medseg.errors import InputError
from medseg.inference.batch import ReportWriter

__all__ = ["merge_reports", "SHARD_REPORT"]

log = logging.getLogger(__name__)

#: The name of shard I of N's report.
SHARD_REPORT = re.compile(r"^predict_report\.shard-(?P<i>\d+)-of-(?P<n>\d+)\.json$")

_SAME = ("model_dir", "configuration", "input", "output_format")  # facts every shard of one run shares


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot be read as a shard report ({exc})",
                         "the report `medseg predict --shard` wrote (rerun that shard)") from None
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise InputError(path, "is not a medseg predict report (no cases list)", "a predict_report.shard-I-of-N.json")
    return data


def merge_reports(out_dir: str | Path) -> Path:
    """Merge ``OUT/predict_report.shard-I-of-N.json`` (every I of one N) into ``OUT/predict_report.json``.

    Args:
        out_dir: the output folder the shards shared.

    Returns:
        The merged report's path.

    Raises:
        InputError: no shard reports, reports of several shard counts, a missing shard, an unreadable report,
            shards of different runs (model, configuration, input or format), or a case in two shards.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise InputError(out, "is not a folder", "the output folder of a sharded `medseg predict`")
    found: dict[int, dict[int, Path]] = {}
    for p in sorted(out.iterdir()):
        m = SHARD_REPORT.match(p.name)
        if m:
            found.setdefault(int(m["n"]), {})[int(m["i"])] = p
    if not found:
        raise InputError(out, "holds no shard reports (predict_report.shard-I-of-N.json)",
                         "the output folder of `medseg predict --shard I/N` or `--shard auto`")
    if len(found) > 1:
        counts = ", ".join(f"{len(v)} of N={n}" for n, v in sorted(found.items()))
        raise InputError(out, f"holds shard reports of several shard counts ({counts})",
                         "the reports of one sharded run only (remove those of the other run)")
    (n, shards), = found.items()
    missing = [i for i in range(n) if i not in shards]
    if missing:
        raise InputError(out, f"lacks the report of shard(s) {missing} of {n}",
                         "every shard finished (rerun the missing shards; finished cases are skipped)")
    reports = [_load(shards[i]) for i in range(n)]
    first = reports[0]
    for i, r in enumerate(reports[1:], 1):
        differ = [k for k in _SAME if r.get(k) != first.get(k)]
        if differ:
            raise InputError(shards[i], f"is from another run than shard 0 ({', '.join(differ)} differ)",
                             "the reports of one sharded run only")
    cases: dict[str, dict[str, Any]] = {}
    for i, r in enumerate(reports):
        for c in r["cases"]:
            if c["case_id"] in cases:
                raise InputError(shards[i], f"repeats case {c['case_id']!r} of another shard",
                                 "shards of one --shard I/N split of one input")
            cases[c["case_id"]] = c
    merged: dict[str, Any] = {k: v for k, v in first.items()
                              if k not in ("counts", "cases", "inputs", "input_counts", "shard", "shard_source",
                                           "seconds")}
    merged["shards"] = n
    merged["shard_reports"] = [shards[i].name for i in range(n)]
    merged["seconds"] = round(sum(float(r.get("seconds") or 0.0) for r in reports), 2)  # summed over the shards
    merged["counts"] = {s: sum(int(r.get("counts", {}).get(s, 0)) for r in reports)
                        for s in ("written", "skipped", "failed")}
    merged["cases"] = [cases[k] for k in sorted(cases)]
    if all("inputs" in r for r in reports):
        entries: dict[str, dict[str, Any]] = {}
        for r in reports:
            for e in r["inputs"]:
                foreign = e.get("case_id") is not None and "belongs to shard" in str(e.get("reason") or "")
                if e["path"] not in entries or not foreign:  # the owning shard's status wins
                    entries[e["path"]] = e
        merged["inputs"] = [entries[k] for k in sorted(entries)]
        merged["input_counts"] = {s: sum(e.get("status") == s for e in merged["inputs"])
                                  for s in ("predicted", "skipped", "failed")}
    size = 16384 + len(json.dumps(merged, indent=2))
    path = ReportWriter(out, None, reserve=size).write(merged)
    log.info("merged %d shard reports into %s", n, path)
    return path
