"""Qualitative figures of the report: stochastic variations of a test scan, an interpolation strip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ldae.evaluation.sections.common import ScanCache


def figures_section(model: Any, scans: ScanCache, df: pd.DataFrame, out: Path, steps: int, seed: int) -> None:
    """``variations.png`` (fixed y_sem, new z_T) of the first test scan and ``interpolation_strip.png``
    between the first and last visit of the test subject with the most visits."""
    from ldae.viz import save_mosaic, save_strip

    test = df[df["split"] == "test"].sort_values(["subject", "session"])
    first = int(test.index[0])
    x = scans.get(first)
    var = model.variations(x, 3, steps, seed=seed)
    rows = [("input", x[0]), ("LDAE reconstruction", model.reconstruct(x, steps)[0])]
    rows += [(f"variation {i}", var[i, 0]) for i in range(3)]
    rows.append(("|variation 0 - variation 1|", (var[0, 0] - var[1, 0]).abs()))
    save_mosaic(out / "variations.png", rows, title=f"{df.loc[first, 'subject']}: fixed y_sem, new z_T")
    counts = test.groupby("subject").size()
    subject = counts.idxmax()
    visits = test[test["subject"] == subject]
    if len(visits) >= 2:
        a, b = int(visits.index[0]), int(visits.index[-1])
        ts = [0.0, 0.25, 0.5, 0.75, 1.0]
        vols = model.interpolate(scans.get(a), scans.get(b), ts, steps)
        m0, m1 = int(df.loc[a, "session"]), int(df.loc[b, "session"])
        labels = [f"M{m0:02d} (input)", *[f"t={t:.2f} (~M{m0 + t * (m1 - m0):.0f})" for t in ts], f"M{m1:02d} (input)"]
        save_strip(out / "interpolation_strip.png", [scans.get(a)[0], *[v[0] for v in vols], scans.get(b)[0]],
                   labels, diff_to=1, title=f"{subject}: LERP y_sem, SLERP z_T")
