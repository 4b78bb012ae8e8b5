"""Evaluation: per-case metrics over folders, summaries with bootstrap CIs, paired comparisons, QA reports.

Importing this package is cheap (NumPy only); plotting and report code load when used::

    from medseg.metrics import compute_metrics
    from medseg.evaluation import summarize_metrics, evaluate_folder
"""

from medseg.evaluation.evaluate import Evaluation, evaluate_folder, write_evaluation
from medseg.evaluation.summary import (
    bootstrap_ci,
    describe,
    format_summary_table,
    json_safe,
    summarize_metrics,
)
from medseg.evaluation.table import read_per_case_csv, write_per_case_csv

__all__ = [
    "Evaluation",
    "evaluate_folder",
    "write_evaluation",
    "summarize_metrics",
    "describe",
    "bootstrap_ci",
    "format_summary_table",
    "json_safe",
    "read_per_case_csv",
    "write_per_case_csv",
]
