"""Data sets: case manifests, dataset checks, patient-grouped splits and the synthetic demo data set.

Importing this package is cheap (no torch); the heavy readers load when a function needs them.
"""

from medseg.data.manifest import Case, Manifest, load_manifest, write_manifest_csv

__all__ = ["Case", "Manifest", "load_manifest", "write_manifest_csv"]
