"""Intensity model of the synthetic cohort: from warped template T1 values to a model-ready scan.

Per subject (fixed across visits, like one scanner and protocol): tissue levels ``gm_level`` and
``csf_level`` (relative to white matter, drawn from real scans' contrast, see ``synthetic_params``),
contrast curvature ``gamma``, receiver gain ``scale``, a smooth multiplicative bias field and a noise
level. Per visit (``Acquisition``): a fresh noise realisation of std ``noise_sd``, the visit's own bias
field (summed into ``log_bias`` by the caller) and a contrast drift.

``T`` maps the template's tissue levels (``intensity.tissue.template``: CSF, GM, WM, measured) to the
visit's, ``level_v = 1 - contrast * (1 - level)``, piecewise linearly (``T(0) = 0``, slope 1 above WM, so
partial-volume voxels map to the same mix of the mapped tissues); ``signal = scale * exp(log_bias) *
T(t1)**gamma``; Rician magnitude ``|signal + n1 + i n2|`` (or Gaussian ``signal + n1``),
``n ~ N(0, noise_sd)`` with the template's white matter at 1; then the brain's ``normalize_percentile``
maps to 1, values are clipped to [0, 1], and voxels outside the warped brain mask are zero
(skull-stripped). A global gain would cancel in that percentile scaling (and in the model-ready one), so
there is none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ldae.data.synthetic_params import Acquisition, SubjectParams
from ldae.errors import ConfigError

NOISE_MODELS = ("rician", "gaussian")


def tissue_transfer(t1: np.ndarray, params: SubjectParams, acq: Acquisition, cfg: Mapping[str, Any]) -> np.ndarray:
    """``T(t1)``: template intensities mapped to the visit's tissue levels (see the module docstring)."""
    tpl = cfg["tissue"]["template"]
    wm, gm, csf = float(tpl["wm"]), float(tpl["gm"]), float(tpl["csf"])
    if not (wm > 0 and 0 < csf < gm < 1):
        raise ConfigError(f"synth config: intensity.tissue.template needs wm > 0 and 0 < csf < gm < 1 (got {tpl})")
    c = float(acq.contrast)
    gm_v, csf_v = 1.0 - c * (1.0 - params.gm_level), 1.0 - c * (1.0 - params.csf_level)
    if not 0.0 < csf_v < gm_v < 1.0:
        raise ConfigError(f"synth: tissue levels GM {gm_v:.3f} / CSF {csf_v:.3f} are not ordered in (0, 1); "
                          "lower intensity.tissue.contrast or acquisition.contrast")
    x = np.clip(t1, 0.0, None)
    knots = np.array([0.0, csf * wm, gm * wm, wm], np.float32)
    levels = np.array([0.0, csf_v * wm, gm_v * wm, wm], np.float32)
    return (np.interp(x, knots, levels) + np.maximum(x - np.float32(wm), 0.0)).astype(np.float32)


def render_intensity(
    t1: np.ndarray,
    mask: np.ndarray,
    log_bias: np.ndarray,
    params: SubjectParams,
    acq: Acquisition,
    cfg: Mapping[str, Any],
    rng: np.random.Generator,
) -> np.ndarray:
    """Voxel values in [0, 1] for warped template intensities ``t1`` with brain-mask fractions ``mask``."""
    model = str(cfg["noise"])
    if model not in NOISE_MODELS:
        raise ConfigError(f"synth config: intensity.noise is '{model}' (choose {' or '.join(NOISE_MODELS)})")
    signal = np.float32(params.intensity_scale) * np.exp(log_bias) * np.power(
        tissue_transfer(t1, params, acq, cfg), np.float32(params.gamma)
    )
    sigma = np.float32(acq.noise_sd)
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
