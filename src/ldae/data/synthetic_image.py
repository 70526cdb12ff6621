"""Intensity model of the synthetic cohort: from warped template T1 values to a model-ready scan.

Per subject (fixed across visits, like one scanner and protocol): contrast ``gamma``, receiver gain
``scale``, a smooth multiplicative bias field and a noise level; per visit: a fresh noise realisation.
``signal = scale * exp(log_bias) * t1**gamma``; Rician magnitude ``|signal + n1 + i n2|`` (or Gaussian
``signal + n1``), ``n ~ N(0, noise_level)`` with the template's white matter at 1; then the brain's
``normalize_percentile`` maps to 1, values are clipped to [0, 1], and voxels outside the warped brain mask
are zero (skull-stripped).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ldae.data.synthetic_params import SubjectParams
from ldae.errors import ConfigError

NOISE_MODELS = ("rician", "gaussian")


def render_intensity(
    t1: np.ndarray,
    mask: np.ndarray,
    log_bias: np.ndarray,
    params: SubjectParams,
    cfg: Mapping[str, Any],
    rng: np.random.Generator,
) -> np.ndarray:
    """Voxel values in [0, 1] for warped template intensities ``t1`` with brain-mask fractions ``mask``."""
    model = str(cfg["noise"])
    if model not in NOISE_MODELS:
        raise ConfigError(f"synth config: intensity.noise is '{model}' (choose {' or '.join(NOISE_MODELS)})")
    signal = np.float32(params.intensity_scale) * np.exp(log_bias) * np.power(
        np.clip(t1, 0.0, None), np.float32(params.gamma)
    )
    sigma = np.float32(params.noise_level)
    n1 = rng.standard_normal(signal.shape, dtype=np.float32) * sigma
    if model == "rician":
        n2 = rng.standard_normal(signal.shape, dtype=np.float32) * sigma
        values = np.sqrt((signal + n1) ** 2 + n2**2)
    else:
        values = signal + n1
    brain = mask >= float(cfg["mask_threshold"])
    if not brain.any():
        return np.zeros_like(values)
    hi = float(np.percentile(values[brain], float(cfg["normalize_percentile"])))
    out = np.clip(values / np.float32(hi), 0.0, 1.0).astype(np.float32)
    out[~brain] = 0.0
    return out
