"""SSIM between consecutive visits (ldae.evaluation.repeat_scans): the scipy SSIM against ldae.metrics.ssim3d,
pairing, caps, skipped pairs and the summary."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ldae.evaluation.repeat_scans import (
    consecutive_pairs,
    consecutive_visit_ssim,
    ssim_volume,
    summarize_ssim,
)
from ldae.metrics import ssim3d


def test_ssim_volume_equals_ssim3d():
    rng = np.random.default_rng(0)
    for shape in ((11, 11, 11), (13, 17, 12)):
        x = rng.random(shape)
        y = np.clip(x + 0.1 * rng.standard_normal(shape), 0, 1)
        ref = float(ssim3d(torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None]))
        assert ssim_volume(x, y) == pytest.approx(ref, abs=1e-6)
    assert ssim_volume(x, x) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match=">= 11"):
        ssim_volume(np.zeros((10, 12, 12)), np.zeros((10, 12, 12)))


def _cohort(tmp_path, volumes: dict[tuple[str, int], np.ndarray]) -> pd.DataFrame:
    rows = []
    for (subject, session), v in volumes.items():
        path = tmp_path / f"{subject}_{session}.npy"
        np.save(path, v)
        rows.append({"subject": subject, "session": session, "path": str(path)})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # any row order


def test_consecutive_pairs_ssim_and_summary(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.random((12, 12, 12)).astype(np.float32) + 0.1
    noisy = np.clip(base + 0.05 * rng.standard_normal(base.shape), 0.01, None).astype(np.float32)
    vols = {("b", 0): base, ("b", 6): base * 3.0, ("b", 12): noisy,       # a gain cancels in the scaling
            ("a", 0): base, ("a", 24): np.ones((14, 12, 12), np.float32) * base.mean(),  # other grid
            ("c", 0): base}                                                # one visit: no pair
    df = _cohort(tmp_path, vols)
    assert [p[:3] for p in consecutive_pairs(df)] == [("a", 0, 24), ("b", 0, 6), ("b", 6, 12)]
    assert len(consecutive_pairs(df, max_pairs=2)) == 2
    pairs = consecutive_visit_ssim(df, read=np.load)
    assert list(pairs["months"]) == [24, 6, 6]
    assert np.isnan(pairs["ssim"].iloc[0])                      # shapes differ: skipped
    assert pairs["ssim"].iloc[1] == pytest.approx(1.0, abs=1e-9)  # same scan, other gain
    assert 0.5 < pairs["ssim"].iloc[2] < 0.99
    summary = summarize_ssim(pairs, total_pairs=3)
    assert summary["pairs"] == 2 and "of_pairs" not in summary
    assert summary["min"] == pytest.approx(pairs["ssim"].iloc[2], abs=1e-5) and summary["max"] == 1.0
    capped = summarize_ssim(consecutive_visit_ssim(df, max_pairs=1, read=np.load), total_pairs=3)
    assert capped == {"pairs": 0, "of_pairs": 3, "median": None, "min": None, "max": None, "q25": None,
                      "q75": None}
