"""The compressed cohort's metadata (``latent_meta.json``, written by ``ldae compress`` beside
``cohort_with_compressed_latent.csv``), read and checked for the stages that train on latents.

Keys the later stages need: ``scale_factor`` (a positive number: latents are multiplied by it so that the
train split has unit variance) and ``latent_shape`` (``[C, D, H, W]``); ``autoencoder_checkpoint`` and
``autoencoder_fingerprint`` name the stage-1 weights the latents came from (recorded in the next
stages' checkpoints, checked when a run is loaded). Everything else is informational.
"""

from __future__ import annotations

import os
from pathlib import Path

from ldae.errors import CohortError
from ldae.runs import LATENT_META

LATENT_DIR = "latents"
META_REQUIRED = ("scale_factor", "latent_shape")  # what the later stages need; compress writes more


def read_latent_meta(csv_or_dir: str | os.PathLike) -> dict:
    """The ``latent_meta.json`` beside a compressed cohort CSV (or in a folder / ``RUN/latents``), checked.

    ``scale_factor`` (a positive number) and ``latent_shape`` (``[C, D, H, W]``) are required; a relative
    ``autoencoder_checkpoint`` is resolved against the JSON's folder (None when absent). Raises
    CohortError naming the file when it is absent, unreadable or invalid.
    """
    import json
    import math

    p = Path(csv_or_dir)
    candidates = [p / LATENT_META, p / LATENT_DIR / LATENT_META] if p.is_dir() else [p.parent / LATENT_META]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise CohortError(f"{csv_or_dir}: no {LATENT_META} found (looked for {', '.join(map(str, candidates))}); "
                          "run `ldae compress` first")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CohortError(f"{path}: cannot read latent metadata ({str(exc).splitlines()[0]})") from None
    if not isinstance(meta, dict):
        raise CohortError(f"{path}: expected a JSON object")
    missing = [k for k in META_REQUIRED if k not in meta]
    if missing:
        raise CohortError(f"{path}: missing key(s) {', '.join(missing)}; rerun `ldae compress`")
    scale = meta["scale_factor"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise CohortError(f"{path}: key 'scale_factor' must be a positive number, got {scale!r}")
    shape = meta["latent_shape"]
    if not isinstance(shape, list) or len(shape) != 4 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise CohortError(f"{path}: key 'latent_shape' must be [C, D, H, W] (positive ints), got {shape!r}")
    ae = meta.get("autoencoder_checkpoint")
    if ae:
        ae_path = Path(ae).expanduser()
        ae = str(ae_path if ae_path.is_absolute() else (path.parent / ae_path).resolve())
    return {**meta, "scale_factor": float(scale), "latent_shape": [int(s) for s in shape],
            "autoencoder_checkpoint": ae or None}
