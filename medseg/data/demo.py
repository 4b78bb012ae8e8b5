"""A small synthetic 3D data set so that the demo and the tests have data on any machine.

Each case is a 32-48 voxel a side MR-like volume: a body of soft tissue in air, holding two labelled structures
of different intensity (1 ``bright``: an ellipsoid brighter than tissue; 2 ``dark``: a smaller ellipsoid darker
than tissue), Gaussian noise and a smooth multiplicative bias field. Every case has its own oblique, anisotropic
voxel-to-world affine with a non-zero origin, so geometry bugs show. Scans of one patient share their anatomy
(structure sizes and positions) but not their noise, bias, small shifts or affine; ``manifest.csv`` names the
patients so that patient-grouped splits are exercised. The layout is MSD (``dataset.json``, ``imagesTr/``,
``labelsTr/``) plus ``manifest.csv``. Everything is a deterministic function of ``seed``.

Variants (``variant=``), each small enough for the default test run:

- ``"mr"`` (the default): 0.8-1.2 x 0.8-1.2 x 1.6-2.6 mm MR-like intensities (dataset.json modality ``MRI``).
- ``"anisotropic"``: 0.7 x 0.7 x 4 mm stacks (8-12 slices of 32-48 voxels a side), MR-like; the planner keeps
  the coarse spacing and plans a topology with no early pooling along it.
- ``"ct"``: Hounsfield-like intensities (air -1000, soft tissue 40, the bright structure 300 like contrast or bone,
  the dark one -90 like fat; no bias field), dataset.json modality ``CT``.
- ``"ct_unnamed"``: the same CT data with no ``modality`` in dataset.json, so the planner must tell CT from the
  intensities.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from medseg.errors import InputError

__all__ = ["make_demo_dataset", "demo_case", "DEMO_LABELS", "demo_patients", "DEMO_VARIANTS"]

log = logging.getLogger(__name__)

#: Label values and names of the demo data set.
DEMO_LABELS = {0: "background", 1: "bright", 2: "dark"}
_TISSUE, _AIR, _BRIGHT, _DARK, _NOISE_SD = 100.0, 10.0, 190.0, 35.0, 12.0
#: Intensities (tissue, air, bright, dark, noise sd) of the CT variants, in Hounsfield units.
_CT_INTENSITIES = (40.0, -1000.0, 300.0, -90.0, 20.0)
#: The variants of :func:`make_demo_dataset`: their dataset.json modality (None: no ``modality`` key).
DEMO_VARIANTS = {"mr": "MRI", "anisotropic": "MRI", "ct": "CT", "ct_unnamed": None}


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


def demo_case(seed: int, patient: int, scan: int, variant: str = "mr") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate one demo case.

    Args:
        seed: data set seed.
        patient: patient index (fixes the anatomy).
        scan: case index (fixes noise, bias field, shift and affine).
        variant: one of :data:`DEMO_VARIANTS` (the module docstring describes them).

    Returns:
        ``(image float32 (X, Y, Z), label uint8 (X, Y, Z), affine 4x4 RAS)``.
    """
    anat = np.random.default_rng(np.random.SeedSequence([seed, patient]))
    rng = np.random.default_rng(np.random.SeedSequence([seed, patient, scan]))
    shape = tuple(int(s) for s in anat.integers(32, 49, size=3))
    if variant == "anisotropic":  # 4 mm slices: about a fifth as many voxels along the coarse axis
        shape = (shape[0], shape[1], max(8, int(round(shape[2] / 4))))
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

    ct = variant in ("ct", "ct_unnamed")
    tissue, air, bright_v, dark_v, noise = _CT_INTENSITIES if ct else (_TISSUE, _AIR, _BRIGHT, _DARK, _NOISE_SD)
    image = np.full(shape, air, dtype=np.float32)
    image[body] = tissue
    image[label == 1] = bright_v
    image[label == 2] = dark_v
    # smooth multiplicative bias field: exp of a random linear + quadratic polynomial, about +-20 % (MR only)
    u = (grid - size.astype(np.float32) / 2) / size.astype(np.float32)
    lin = rng.uniform(-0.35, 0.35, size=3).astype(np.float32)
    quad = rng.uniform(-0.6, 0.6, size=3).astype(np.float32)
    if not ct:
        image *= np.exp(u @ lin + (u * u) @ quad)
    image += rng.normal(0.0, noise, size=shape).astype(np.float32)

    spacing = np.array([rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2), rng.uniform(1.6, 2.6)])
    if variant == "anisotropic":
        spacing = np.array([0.7, 0.7, 4.0])
    affine = np.eye(4)
    affine[:3, :3] = _random_rotation(rng, 25, 8) @ np.diag(spacing)
    affine[:3, 3] = rng.uniform(-80, 80, size=3)
    return image.astype(np.float32), label, affine


def make_demo_dataset(out: str | Path, n_cases: int = 12, seed: int = 0, *, force: bool = False,
                      variant: str = "mr") -> Path:
    """Write the synthetic demo data set (MSD layout plus ``manifest.csv``) to ``out``.

    Args:
        out: target folder; created; must be empty or absent unless ``force``.
        n_cases: number of cases (>= 1).
        seed: the data set is a deterministic function of this seed.
        force: overwrite the demo's files in a non-empty ``out`` (other files there are left alone).
        variant: one of :data:`DEMO_VARIANTS`: ``mr`` (default), ``anisotropic`` (0.7 x 0.7 x 4 mm), ``ct``
            (HU-like, modality CT), ``ct_unnamed`` (HU-like, no modality in dataset.json).

    Returns:
        ``out`` as a Path.

    Raises:
        InputError: ``out`` is a file, or a non-empty folder and ``force`` is false.
        ConfigError: ``n_cases`` below 1, or an unknown ``variant``.
    """
    from medseg.data.manifest import Case, Manifest, write_manifest_csv
    from medseg.io import Volume, atomic_path, write_volume

    out = Path(out)
    if n_cases < 1:
        from medseg.errors import ConfigError

        raise ConfigError("n_cases", n_cases, "at least 1")
    if variant not in DEMO_VARIANTS:
        from medseg.errors import ConfigError

        raise ConfigError("variant", variant, "one of " + ", ".join(DEMO_VARIANTS))
    if out.exists() and not out.is_dir():
        raise InputError(out, "is a file", "a new or empty folder for the demo data set")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(out, "is not empty", "a new or empty folder (or --force to overwrite the demo's files)")
    patients = demo_patients(n_cases)
    cases, training = [], []
    for i, patient in enumerate(patients):
        cid = f"demo_{i:03d}"
        image, label, affine = demo_case(seed, patient, i, variant)
        img_path, lab_path = out / "imagesTr" / f"{cid}.nii.gz", out / "labelsTr" / f"{cid}.nii.gz"
        meta = {"qform_code": 1, "sform_code": 1}
        write_volume(Volume(image[None], affine, 3, dict(meta)), img_path)
        write_volume(Volume(label[None], affine, 3, dict(meta)), lab_path)
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
        cases.append(Case(cid, f"patient_{patient:03d}", [img_path], lab_path))
    modality = DEMO_VARIANTS[variant]
    kind = {"mr": "MR-like volumes", "anisotropic": "MR-like 0.7 x 0.7 x 4 mm stacks",
            "ct": "CT-like volumes (HU)", "ct_unnamed": "CT-like volumes (HU)"}[variant]
    dataset: dict = {
        "name": "MedsegDemo",
        "description": f"Synthetic {kind}: a bright and a dark ellipsoid in soft tissue, with noise, "
        + ("" if modality in (None, "CT") else "bias field ") + "and oblique anisotropic affines (medseg.data.demo)",
        "reference": "generated by medseg",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": modality},
        "labels": {str(k): v for k, v in DEMO_LABELS.items()},
        "numTraining": n_cases,
        "numTest": 0,
        "training": training,
        "test": [],
        "medseg_demo": {"seed": seed, "n_cases": n_cases, "variant": variant},
    }
    if modality is None:
        del dataset["modality"]
    with atomic_path(out / "dataset.json") as tmp:
        tmp.write_text(json.dumps(dataset, indent=2) + "\n")
    manifest = Manifest(out, "MedsegDemo", cases, dict(DEMO_LABELS), {0: modality or "unknown"}, 3, [])
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
