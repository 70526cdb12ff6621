"""Shared fixtures: small NIfTI cohorts written in the test's tmp folder, fixed seeds."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _seed() -> None:
    import torch

    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def phantom_cohort(tmp_path: Path) -> Path:
    """A 6-subject, 2-session phantom cohort (32×40×32 at 6 mm); returns the CSV path."""
    from ldae.data.phantom import write_phantom_cohort

    return write_phantom_cohort(tmp_path / "cohort", n_subjects=6, sessions=(0, 12), seed=0)
