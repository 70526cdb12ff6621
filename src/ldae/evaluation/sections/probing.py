"""``probe`` and ``factors`` sections: linear probes on frozen embeddings.

* :func:`probe_section`: AD vs CN (logistic) and age (ridge) per feature set (learned y_sem, untrained
  encoder, latent PCA, oracle, a baseline), protocol of :mod:`ldae.evaluation.probes`;
* :func:`factor_section`: what the embeddings encode — a ridge probe per known per-scan factor column.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ldae.evaluation.results import FactorFit, FactorSection, FeatureProbes, ProbeSection


def probe_section(features: dict[str, np.ndarray], df: pd.DataFrame, seed: int) -> ProbeSection:
    """AD-vs-CN and age probes for each feature set (name -> (n, d) aligned with ``df``). The oracle's
    last column is age, which must not predict itself: its age probe uses the volumes only."""
    from ldae.evaluation.probes import probe_ad_vs_cn, probe_age

    split, subject = df["split"].to_numpy(), df["subject"].to_numpy()
    sets: dict[str, FeatureProbes] = {}
    for name, X in features.items():
        X_age = X[:, :-1] if name == "oracle" else X
        ad = probe_ad_vs_cn(X, df["diagnosis"].to_numpy(), split, subject, seed=seed)
        age = probe_age(X_age, df["age"].to_numpy(), split, subject, seed=seed)
        sets[name] = FeatureProbes.from_results(ad, age)
    return ProbeSection(sets)


def factor_section(features: dict[str, np.ndarray], df: pd.DataFrame, factors: list[str], seed: int) -> FactorSection:
    """What the embeddings encode: a ridge probe per known per-scan factor (a cohort column: ground-truth
    volumes, age, ...) for each feature set, with the test-split R² and MAE. Columns absent from the
    cohort, or not numeric and finite on every row, are listed under ``skipped``."""
    from ldae.evaluation.probes import probe_regression

    usable: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    for col in factors:
        if col not in df.columns:
            skipped[col] = "not a cohort column"
            continue
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
        if np.isfinite(values).all():
            usable[col] = values
        else:
            skipped[col] = "missing or non-numeric values"
    fits: dict[str, dict[str, FactorFit]] = {name: {} for name in features}
    for name, X in features.items():
        for col, values in usable.items():
            r = probe_regression(X, values, df["split"].to_numpy(), df["subject"].to_numpy(),
                                 seed=seed, what=f"{col} probe ({name})", target=col)
            fits[name][col] = FactorFit.from_result(r)
    return FactorSection(fits, skipped)
