"""Tiny analytic brain-like phantoms for fast tests and smoke runs (not the realistic cohort: see
``ldae.data.synthetic``). An ellipsoid 'brain' with two 'ventricles' whose size grows with a severity
parameter, so that shapes carry a known, checkable signal."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ldae.data.cohort import write_cohort
from ldae.data.geometry import model_grid_affine
from ldae.io import write_nifti


def phantom_volume(
    shape: Sequence[int] = (32, 40, 32), severity: float = 0.0, seed: int = 0, noise: float = 0.02
) -> np.ndarray:
    """A float32 volume in [0, 1]: ellipsoid brain (0.8), enlarged 'ventricles' (0.2) with severity."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    x, y, z = grids
    brain = (x / 0.8) ** 2 + (y / 0.85) ** 2 + (z / 0.75) ** 2 <= 1.0
    r = 0.12 + 0.1 * severity
    vent = ((x - 0.18) ** 2 + y**2 / 2.5 + z**2) <= r**2
    vent |= ((x + 0.18) ** 2 + y**2 / 2.5 + z**2) <= r**2
    vol = np.where(brain, 0.8, 0.0) - np.where(brain & vent, 0.6, 0.0)
    vol = vol + noise * rng.standard_normal(vol.shape) * brain
    return np.clip(vol, 0.0, 1.0).astype(np.float32)


def write_phantom_cohort(
    out: str | Path,
    n_subjects: int = 6,
    sessions: Sequence[int] = (0, 12),
    shape: Sequence[int] = (32, 40, 32),
    spacing: float = 6.0,
    seed: int = 0,
) -> Path:
    """Write ``out/images/*.nii.gz`` and ``out/cohort.csv`` (CN/MCI/AD cycling); return the CSV path."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    affine = model_grid_affine(spacing, shape)  # the model's grid: model-ready as written
    rows = []
    for s in range(n_subjects):
        diagnosis = ("CN", "MCI", "AD")[s % 3]
        age0 = float(rng.uniform(60, 85))
        for months in sessions:
            severity = {"CN": 0.0, "MCI": 0.5, "AD": 1.0}[diagnosis] + 0.02 * months / 12
            path = out / "images" / f"sub-{s:04d}_ses-M{months:02d}_T1w.nii.gz"
            write_nifti(path, phantom_volume(shape, severity, seed=seed * 1000 + s * 100 + months), affine)
            rows.append(
                {
                    "subject": f"sub-{s:04d}",
                    "session": months,
                    "path": str(path),
                    "diagnosis": diagnosis,
                    "age": round(age0 + months / 12, 2),
                }
            )
    return write_cohort(pd.DataFrame(rows), out / "cohort.csv")
