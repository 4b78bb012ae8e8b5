"""A small synthetic 3D data set so that the demo and the tests have data on any machine.

Each case is a 32-48 voxel a side MR-like volume: a body of soft tissue in air, holding two labelled structures
of different intensity (1 ``bright``: an ellipsoid brighter than tissue; 2 ``dark``: a smaller ellipsoid darker
than tissue), Gaussian noise and a smooth multiplicative bias field. Every case has its own oblique, anisotropic
voxel-to-world affine with a non-zero origin, so geometry bugs show. Scans of one patient share their anatomy
(structure sizes and positions) but not their noise, bias, small shifts or affine; ``manifest.csv`` names the
patients so that patient-grouped splits are exercised. The layout is MSD (``dataset.json``, ``imagesTr/``,
``labelsTr/``) plus ``manifest.csv``. Everything is a deterministic function of ``seed``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from medseg.errors import InputError

__all__ = ["make_demo_dataset", "demo_case", "DEMO_LABELS", "demo_patients"]

log = logging.getLogger(__name__)

#: Label values and names of the demo data set.
DEMO_LABELS = {0: "background", 1: "bright", 2: "dark"}
_TISSUE, _AIR, _BRIGHT, _DARK, _NOISE_SD = 100.0, 10.0, 190.0, 35.0, 12.0


def demo_patients(n_cases: int) -> list[int]:
    """Patient index of each demo case: cases 0-1 are one patient, 2-4 another, then one case per patient.

    Args:
        n_cases: number of cases.

    Returns:
        A list of ``n_cases`` patient indices.
    """
    out: list[int] = []
    patient = 0
    for size in [2, 3] + [1] * n_cases:
        out.extend([patient] * size)
        patient += 1
        if len(out) >= n_cases:
            break
    return out[:n_cases]


def demo_case(seed: int, patient: int, scan: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate one demo case.

    Args:
        seed: data set seed.
        patient: patient index (fixes the anatomy).
        scan: case index (fixes noise, bias field, shift and affine).

    Returns:
        ``(image float32 (X, Y, Z), label uint8 (X, Y, Z), affine 4x4 RAS)``.
    """
    anat = np.random.default_rng(np.random.SeedSequence([seed, patient]))
    rng = np.random.default_rng(np.random.SeedSequence([seed, patient, scan]))
    shape = tuple(int(s) for s in anat.integers(32, 49, size=3))
    size = np.array(shape, dtype=np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), axis=-1)
    shift = rng.uniform(-1.5, 1.5, size=3)
    center = size / 2 + anat.uniform(-0.05, 0.05, size=3) * size + shift

    body = _ellipsoid(grid, center, size * anat.uniform(0.40, 0.46, size=3), _random_rotation(anat, 15))
    direction = anat.normal(size=3)
    direction /= np.linalg.norm(direction)
    offset = direction * size * 0.19
    bright = _ellipsoid(grid, center - offset, size * anat.uniform(0.15, 0.21, size=3), _random_rotation(anat, 90))
    dark = _ellipsoid(grid, center + offset, size * anat.uniform(0.11, 0.15, size=3), _random_rotation(anat, 90))
    dark &= ~bright
    label = np.zeros(shape, dtype=np.uint8)
    label[bright & body] = 1
    label[dark & body] = 2

    image = np.full(shape, _AIR, dtype=np.float32)
    image[body] = _TISSUE
    image[label == 1] = _BRIGHT
    image[label == 2] = _DARK
    # smooth multiplicative bias field: exp of a random linear + quadratic polynomial, about +-20 %
    u = (grid - size.astype(np.float32) / 2) / size.astype(np.float32)
    lin = rng.uniform(-0.35, 0.35, size=3).astype(np.float32)
    quad = rng.uniform(-0.6, 0.6, size=3).astype(np.float32)
    image *= np.exp(u @ lin + (u * u) @ quad)
    image += rng.normal(0.0, _NOISE_SD, size=shape).astype(np.float32)

    spacing = np.array([rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2), rng.uniform(1.6, 2.6)])
    affine = np.eye(4)
    affine[:3, :3] = _random_rotation(rng, 25, 8) @ np.diag(spacing)
    affine[:3, 3] = rng.uniform(-80, 80, size=3)
    return image.astype(np.float32), label, affine


def make_demo_dataset(out: str | Path, n_cases: int = 12, seed: int = 0, *, force: bool = False) -> Path:
    """Write the synthetic demo data set (MSD layout plus ``manifest.csv``) to ``out``.

    Args:
        out: target folder; created; must be empty or absent unless ``force``.
        n_cases: number of cases (>= 1).
        seed: the data set is a deterministic function of this seed.
        force: overwrite the demo's files in a non-empty ``out`` (other files there are left alone).

    Returns:
        ``out`` as a Path.

    Raises:
        InputError: ``out`` is a file, or a non-empty folder and ``force`` is false.
    """
    from medseg.data.manifest import Case, Manifest, write_manifest_csv
    from medseg.io import Volume, atomic_path, write_volume

    out = Path(out)
    if n_cases < 1:
        from medseg.errors import ConfigError

        raise ConfigError("n_cases", n_cases, "at least 1")
    if out.exists() and not out.is_dir():
        raise InputError(out, "is a file", "a new or empty folder for the demo data set")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(out, "is not empty", "a new or empty folder (or --force to overwrite the demo's files)")
    patients = demo_patients(n_cases)
    cases, training = [], []
    for i, patient in enumerate(patients):
        cid = f"demo_{i:03d}"
        image, label, affine = demo_case(seed, patient, i)
        img_path, lab_path = out / "imagesTr" / f"{cid}.nii.gz", out / "labelsTr" / f"{cid}.nii.gz"
        meta = {"qform_code": 1, "sform_code": 1}
        write_volume(Volume(image[None], affine, 3, dict(meta)), img_path)
        write_volume(Volume(label[None], affine, 3, dict(meta)), lab_path)
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
        cases.append(Case(cid, f"patient_{patient:03d}", [img_path], lab_path))
    dataset = {
        "name": "MedsegDemo",
        "description": "Synthetic MR-like volumes: a bright and a dark ellipsoid in soft tissue, with noise, bias "
        "field and oblique anisotropic affines (medseg.data.demo)",
        "reference": "generated by medseg",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {str(k): v for k, v in DEMO_LABELS.items()},
        "numTraining": n_cases,
        "numTest": 0,
        "training": training,
        "test": [],
        "medseg_demo": {"seed": seed, "n_cases": n_cases},
    }
    with atomic_path(out / "dataset.json") as tmp:
        tmp.write_text(json.dumps(dataset, indent=2) + "\n")
    manifest = Manifest(out, "MedsegDemo", cases, dict(DEMO_LABELS), {0: "MRI"}, 3, [])
    write_manifest_csv(manifest, out / "manifest.csv")
    log.debug("wrote %d demo cases of %d patients to %s (seed %d)", n_cases, len(set(patients)), out, seed)
    return out


def _ellipsoid(grid: np.ndarray, center: np.ndarray, radii: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Boolean mask of a rotated ellipsoid on a voxel grid ``(X, Y, Z, 3)``."""
    local = (grid - center.astype(np.float32)) @ rotation.astype(np.float32)
    return np.sum((local / radii.astype(np.float32)) ** 2, axis=-1) <= 1.0


def _random_rotation(rng: np.random.Generator, max_degrees: float, min_degrees: float = 0.0) -> np.ndarray:
    """A rotation about a random axis by ``min_degrees`` to ``max_degrees`` either way (Rodrigues' formula)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(min_degrees, max_degrees) * rng.choice([-1.0, 1.0]))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)
