"""Layout of a full LDAE run folder (what ``ldae pipeline`` writes and ``LDAE.load`` reads)::

    RUN/autoencoder/      stage 1 run (checkpoints/best.ckpt, config.yaml, figures/)
    RUN/latents/          `ldae compress` output (cohort_with_compressed_latent.csv, latent_meta.json, *.npz)
    RUN/diffusion/        stage 2 run
    RUN/representation/   stage 3 run
    RUN/voxel_dae/        baseline: voxel-space diffusion autoencoder (optional)
    RUN/supervised/       baseline: the same encoder trained with labels (optional)
    RUN/evaluation/       `ldae evaluate` output (metrics.json, probes, figures)

A stage folder may also be given directly wherever a run is expected.
"""

from __future__ import annotations

from pathlib import Path

from ldae.config import BASELINES, STAGES
from ldae.errors import CheckpointError

#: the folder of each part of a run, named after it (docstring above)
STAGE_DIRS = {name: name for name in (STAGES[0], "latents", *STAGES[1:], *BASELINES, "evaluation")}
COMPRESSED_CSV = "cohort_with_compressed_latent.csv"
LATENT_META = "latent_meta.json"


def stage_dir(run: str | Path, stage: str) -> Path:
    """``RUN/<stage>`` for a full run folder."""
    return Path(run) / STAGE_DIRS[stage]


def find_checkpoint(run: str | Path, stage: str, which: str = "best") -> Path:
    """The ``which`` (best/last) checkpoint of ``stage`` in a full run folder, a stage folder, or a
    checkpoint path itself; CheckpointError saying what was looked for otherwise."""
    run = Path(run)
    if run.is_file():
        return run
    candidates = [
        run / STAGE_DIRS[stage] / "checkpoints" / f"{which}.ckpt",
        run / "checkpoints" / f"{which}.ckpt",
    ]
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError(
        f"{run}: no {stage} checkpoint found (looked for {', '.join(str(c) for c in candidates)})"
    )
