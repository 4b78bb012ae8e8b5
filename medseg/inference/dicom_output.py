"""Predicted masks as DICOM objects that reference the input series: DICOM-SEG or RTSTRUCT.

What ``medseg predict --output-format dicom-seg|rtstruct`` writes for a DICOM input. Names come from the
predictor's ``labels`` ({value: name}); display colours and coded concepts from its optional ``label_colors`` and
``label_codes`` (same keys; see :mod:`medseg.io.label_style`), which the model record will carry from
dataset.json. Without them every label gets a palette colour and the generic concept "Tissue".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medseg.io.volume import Volume

__all__ = ["DICOM_FORMATS", "mask_file_name", "write_dicom_mask"]

#: Output formats that are DICOM objects referencing the input series, and the suffix of their file name.
DICOM_FORMATS = {"dicom-seg": ".dcm", "rtstruct": "_rtstruct.dcm"}


def mask_file_name(case_id: str, output_format: str) -> str:
    """The mask's file name for a case: ``CASE.nii.gz``, ``CASE.dcm`` (DICOM-SEG) or ``CASE_rtstruct.dcm``."""
    return case_id + DICOM_FORMATS.get(output_format, ".nii.gz")


def write_dicom_mask(output_format: str, label: Volume, source_dir: str | Path, path: str | Path,
                     predictor: Any, series_uid: str | None = None) -> None:
    """Write a predicted label map as a DICOM-SEG or an RTSTRUCT referencing ``source_dir``'s series.

    Args:
        output_format: ``"dicom-seg"`` or ``"rtstruct"``.
        label: the prediction, on the source series' grid.
        source_dir: the input DICOM series folder.
        path: output file.
        predictor: anything with ``output_labels`` (``{label value: name}``; else ``labels``), optionally
            ``label_values``, ``label_colors`` / ``label_codes``.
        series_uid: the source series (default the label's ``meta["series_uid"]``).

    Raises:
        InputError: the label is not on the source grid (e.g. a resampled tilted series) or the source cannot be
            referenced.
    """
    from medseg.io.dicom_seg import write_dicom_seg
    from medseg.io.rtstruct import write_rtstruct

    # the mask holds the data's label values (e.g. 200/500), named by output_labels; background is the first value
    names = getattr(predictor, "output_labels", None) or predictor.labels
    background = (getattr(predictor, "label_values", None) or [0])[0]
    labels = {int(k): v for k, v in names.items() if int(k) != int(background)}
    writer = write_rtstruct if output_format == "rtstruct" else write_dicom_seg
    writer(label, source_dir, path, labels, series_uid=series_uid, colors=getattr(predictor, "label_colors", None),
           codes=getattr(predictor, "label_codes", None))
