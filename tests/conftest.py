"""Shared fixtures: small NIfTI cohorts written in the test's tmp folder, fixed seeds."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
# ITK fixes its thread count when ``ants`` is first imported; tests import it directly (importorskip) before
# ldae.data.ants.require_ants can set its repeatable default of one thread, so set it here as ldae would
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")


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


TINY_RUN_OVERRIDES = [
    "--autoencoder.trainer.max_epochs", "1",
    "--diffusion.trainer.max_epochs", "1",
    "--diffusion.validation.sample_every_n_epochs", "0",
    "--representation.trainer.max_epochs", "1",
    "--representation.trainer.check_val_every_n_epoch", "1",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (briefly trained) tiny LDAE run on a 15-subject phantom cohort: stages 1-3 + latents.

    Session-scoped: built once (about a minute on 2 idle cores) and shared by the API/evaluation tests.
    ``LDAE_TEST_TINY_RUN=DIR`` reuses (or creates) a run folder across sessions while developing."""
    from ldae.data.cohort import assign_splits, read_cohort, write_cohort
    from ldae.data.phantom import write_phantom_cohort
    from ldae.jobs.pipeline import run_pipeline

    reuse = os.environ.get("LDAE_TEST_TINY_RUN")
    root = Path(reuse) if reuse else tmp_path_factory.mktemp("tiny_run")
    if reuse and (root / "run" / "representation" / "done.json").is_file():
        return root / "run"
    csv = write_phantom_cohort(root / "cohort", n_subjects=15, sessions=(0, 12, 24), seed=0)
    df = assign_splits(read_cohort(csv), test_fraction=0.2, val_fraction=0.17, seed=0)
    write_cohort(df, csv)
    run = root / "run"
    run_pipeline("tiny", csv, run, overrides=TINY_RUN_OVERRIDES,
                 steps=("autoencoder", "compress", "diffusion", "representation"))
    return run
