"""The checkpoint format of ldae.

Every stage checkpoint is a Lightning checkpoint (``state_dict``, optimiser states, ...) that also carries
``checkpoint[CHECKPOINT_KEY] = {'stage', 'preset', 'config', ...}``: the stage it belongs to, the preset and
the fully resolved config, plus stage-specific facts (latent scale, upstream checkpoints and their weights
fingerprints). Loading goes through :func:`load_checkpoint` (``weights_only=True``; the stage is checked) so
that a checkpoint of the wrong stage or a corrupt file fails with one line naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ldae.errors import CheckpointError

CHECKPOINT_KEY = "ldae"


def stage_metadata(cfg: dict, stage: str) -> dict:
    """The block stored under ``checkpoint['ldae']``."""
    return {"stage": stage, "preset": cfg.get("preset"), "config": cfg}


def load_checkpoint(path: str | os.PathLike, stage: str | None = None) -> dict:
    """Load a checkpoint safely (``weights_only=True``) and check it belongs to ``stage``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling/zip failure is a corrupt checkpoint
        raise CheckpointError(f"{path}: cannot load checkpoint ({str(exc).splitlines()[0]})") from None
    meta = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if stage is not None:
        found = meta.get("stage") if isinstance(meta, dict) else None
        if found != stage:
            raise CheckpointError(
                f"{path}: this is a checkpoint of stage '{found or 'unknown'}', expected stage '{stage}'"
            )
    return ckpt
