"""How alike two consecutive visits of one subject are: SSIM between repeat scans of a cohort.

Interpolating a missing visit is only a test of a model when the visits differ: a cohort whose visits are
near copies (SSIM ~0.9998) lets "copy the nearest visit" win. Real repeat T1 scans differ by a new noise
realisation, bias field, residual misregistration and intensity drift besides atrophy; ``ldae check``
reports this number so a user sees what a cohort's interpolation task can show.

Each volume is scaled to [0, 1] by the model-ready intensity rule (:func:`ldae.data.transforms.robust_scale`)
and compared with the subject's next visit on the grid both are stored on (pairs on different grids are
skipped: their SSIM is NaN). The SSIM follows
:func:`ldae.metrics.ssim3d` exactly (3D Gaussian window sigma 1.5 truncated at 3.5 sigma, K1 0.01,
K2 0.03, population covariances, mean over the voxels whose window lies inside the volume) but runs in
scipy (float64): ~25x faster than torch's conv3d on CPU for one pair.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from ldae.metrics import SSIM_K1, SSIM_K2, SSIM_SIGMA, SSIM_TRUNCATE


def ssim_volume(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM of two 3D volumes (the conventions of :func:`ldae.metrics.ssim3d`)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 3:
        raise ValueError(f"ssim_volume: expected two 3D volumes of one shape, got {x.shape} and {y.shape}")
    r = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    if min(x.shape) < 2 * r + 1:
        raise ValueError(f"ssim_volume needs every size >= {2 * r + 1}, got {x.shape}")
    inner = (slice(r, -r),) * 3

    def blur(a: np.ndarray) -> np.ndarray:  # zero padding never reaches the cropped inner region
        return ndimage.gaussian_filter(a, SSIM_SIGMA, truncate=SSIM_TRUNCATE, mode="constant")[inner]

    ux, uy = blur(x), blur(y)
    vx, vy, vxy = blur(x * x) - ux * ux, blur(y * y) - uy * uy, blur(x * y) - ux * uy
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(s.mean())


def consecutive_pairs(df: pd.DataFrame, max_pairs: int | None = None) -> list[tuple[str, int, int, str, str]]:
    """``(subject, session_a, session_b, path_a, path_b)`` for consecutive visits, subjects sorted, at
    most ``max_pairs`` (whole subjects first; ``None``: all)."""
    pairs: list[tuple[str, int, int, str, str]] = []
    for subject, g in df.sort_values(["subject", "session"]).groupby("subject", sort=True):
        rows = list(zip(g["session"], g["path"]))
        for (sa, pa), (sb, pb) in zip(rows, rows[1:]):
            if max_pairs is not None and len(pairs) >= max_pairs:
                return pairs
            pairs.append((str(subject), int(sa), int(sb), str(pa), str(pb)))
    return pairs


def consecutive_visit_ssim(
    df: pd.DataFrame,
    max_pairs: int | None = None,
    read: Callable[[str], np.ndarray] | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> pd.DataFrame:
    """SSIM between consecutive visits of each subject: columns ``subject, session_a, session_b, months,
    ssim`` (NaN where the two volumes differ in shape or are smaller than the SSIM window)."""
    from ldae.data.transforms import read_volume, robust_scale

    if read is None:
        def read(path: str) -> np.ndarray:
            return read_volume(path)[0]

    def unit(path: str) -> np.ndarray:
        return robust_scale(read(path), source=path)

    pairs = consecutive_pairs(df, max_pairs)
    rows, cache = [], {}
    for subject, sa, sb, pa, pb in (progress(pairs) if progress else pairs):
        a = cache.pop(pa, None)
        a = unit(pa) if a is None else a
        b = unit(pb)
        cache = {pb: b}  # the next pair of this subject starts at this visit
        try:
            value = ssim_volume(a, b)
        except ValueError:
            value = float("nan")
        rows.append({"subject": subject, "session_a": sa, "session_b": sb, "months": sb - sa, "ssim": value})
    return pd.DataFrame(rows, columns=["subject", "session_a", "session_b", "months", "ssim"])


def summarize_ssim(pairs: pd.DataFrame, total_pairs: int | None = None) -> dict[str, Any]:
    """``{pairs, median, min, max, q25, q75[, of_pairs]}`` of the finite SSIM values (None when none)."""
    values = pairs["ssim"].to_numpy(float) if len(pairs) else np.zeros(0)
    values = values[np.isfinite(values)]
    out: dict[str, Any] = {"pairs": int(values.size)}
    if total_pairs is not None and total_pairs != len(pairs):
        out["of_pairs"] = int(total_pairs)
    if values.size:
        q = np.percentile(values, [0, 25, 50, 75, 100])
        out.update({"median": round(float(q[2]), 5), "min": round(float(q[0]), 5), "max": round(float(q[4]), 5),
                    "q25": round(float(q[1]), 5), "q75": round(float(q[3]), 5)})
    else:
        out.update({"median": None, "min": None, "max": None, "q25": None, "q75": None})
    return out
