"""Missing-timepoint prediction bookkeeping (paper §4.2 / §5.5): triplets, baselines, interpolation, summaries.

For every subject with at least three sessions, every ordered triplet of sessions
``start < target < end`` (months) is a test case: the method sees ``start`` and ``end`` and predicts
``target`` at ``t = (target - start) / (end - start)``. Scores (SSIM, MSE, ...) per triplet and method are
summarised overall and stratified by

* time gap ``end - start`` (months),
* prediction gap ``min(target - start, end - target)`` (months to the nearest observed visit),
* relative position of the target: ``early`` (t <= 1/3), ``middle`` (1/3 < t < 2/3), ``late`` (t >= 2/3).

:func:`nearest_visit_baseline` is the trivial baseline (copy the closer endpoint; ties go to the earlier
visit); interpolation itself (:func:`ldae.diffusion.interpolation.lerp`/``slerp``) lives with the diffusion maths.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from ldae.diffusion.interpolation import check_same_shape, to_torch
from ldae.errors import CohortError, LDAEError

TRIPLET_COLUMNS = (
    "subject",
    "start_month",
    "target_month",
    "end_month",
    "start_index",
    "target_index",
    "end_index",
    "t",
    "time_gap_months",
    "prediction_gap_months",
    "relative_position",
)
POSITIONS = ("early", "middle", "late")
# Right-closed month bins: (0, 12], (12, 24], ...; the last bin is open-ended.
DEFAULT_TIME_GAP_EDGES: tuple[float, ...] = (0, 12, 24, 36, 48, math.inf)
DEFAULT_PREDICTION_GAP_EDGES: tuple[float, ...] = (0, 6, 12, 24, math.inf)
DEFAULT_METRICS = ("ssim", "mse", "psnr", "mae")
_EPS = 1e-9


def relative_position(t: float) -> str:
    """``early`` for t <= 1/3, ``late`` for t >= 2/3, else ``middle`` (symmetric around 0.5)."""
    if t <= 1 / 3 + _EPS:
        return "early"
    if t >= 2 / 3 - _EPS:
        return "late"
    return "middle"


def enumerate_triplets(df: pd.DataFrame) -> pd.DataFrame:
    """All (start, target, end) session triplets of subjects with >= 3 sessions.

    ``df`` needs ``subject`` and ``session`` (months, int) columns; the ``*_index`` columns hold the
    index labels of ``df`` for each session. Rows are ordered by subject, then start, target, end.
    """
    missing = [c for c in ("subject", "session") if c not in df.columns]
    if missing:
        raise CohortError(f"triplets: cohort lacks column(s) {missing}")
    rows: list[dict[str, Any]] = []
    for subject, group in df.groupby(df["subject"].astype(str), sort=True):
        months = group["session"].to_numpy()
        if len(set(months.tolist())) != len(months):
            raise CohortError(f"triplets: subject {subject} has duplicate sessions {sorted(months.tolist())}")
        order = np.argsort(months, kind="stable")
        ses = [(int(months[i]), group.index[i]) for i in order]
        for (m0, i0), (m1, i1), (m2, i2) in itertools.combinations(ses, 3):
            t = (m1 - m0) / (m2 - m0)
            rows.append(
                {
                    "subject": subject,
                    "start_month": m0,
                    "target_month": m1,
                    "end_month": m2,
                    "start_index": i0,
                    "target_index": i1,
                    "end_index": i2,
                    "t": t,
                    "time_gap_months": m2 - m0,
                    "prediction_gap_months": min(m1 - m0, m2 - m1),
                    "relative_position": relative_position(t),
                }
            )
    return pd.DataFrame(rows, columns=list(TRIPLET_COLUMNS))


def nearest_visit_is_start(t: Any) -> np.ndarray:
    """True where the start visit is the nearest to the target (``t <= 0.5``: ties go to the earlier visit)."""
    return np.asarray(t, dtype=np.float64) <= 0.5


def nearest_visit_baseline(start: Any, end: Any, t: Any) -> Any:
    """Trivial baseline: copy the endpoint closer in time to the target (ties -> the earlier, ``start``).

    ``start``/``end`` are single volumes/latents with a scalar ``t``, or batches (B, ...) with ``t`` of
    shape (B,). Works on numpy arrays and torch tensors (same type out).
    """
    is_start = nearest_visit_is_start(t)
    if is_start.ndim == 0:
        return start if bool(is_start) else end
    ts, was_np = to_torch(start)
    te, _ = to_torch(end)
    check_same_shape(ts, te)
    if ts.ndim < 1 or ts.shape[0] != is_start.shape[0]:
        raise LDAEError(f"nearest visit: {is_start.shape[0]} t values for a batch of shape {tuple(ts.shape)}")
    mask = torch.as_tensor(is_start, device=ts.device).reshape(-1, *([1] * (ts.ndim - 1)))
    out = torch.where(mask, ts, te)
    return out.numpy() if was_np else out


# ------------------------------------------------------------------------------------------- summaries
def _bin_labels(edges: Sequence[float]) -> list[str]:
    labels = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        labels.append(f">{lo:g}" if math.isinf(hi) else f"{lo:g}-{hi:g}")
    return labels


def gap_bin(values: Any, edges: Sequence[float]) -> pd.Categorical:
    """Right-closed month bins ``(lo, hi]`` labelled ``"lo-hi"`` (``">lo"`` for an open-ended last bin)."""
    return pd.cut(pd.Series(values, dtype=float), bins=list(edges), right=True, labels=_bin_labels(edges))


def summarize_triplet_scores(
    df_scores: pd.DataFrame,
    metrics: Sequence[str] | None = None,
    time_gap_edges: Sequence[float] = DEFAULT_TIME_GAP_EDGES,
    prediction_gap_edges: Sequence[float] = DEFAULT_PREDICTION_GAP_EDGES,
) -> dict[str, Any]:
    """Mean scores per method, overall and stratified by time gap, prediction gap and relative position.

    ``df_scores`` has one row per (triplet, method): the triplet columns of :func:`enumerate_triplets`, a
    ``method`` column (e.g. ``ldae``, ``nearest_visit``, ``latent_lerp``; absent = one method ``"all"``)
    and metric columns (default: whichever of ssim, mse, psnr, mae exist). Returns
    ``{method: {<metric>: mean, "n_triplets": n, "by_time_gap": {bin: {<metric>: mean, "n": n}},
    "by_prediction_gap": {...}, "by_relative_position": {...}}}`` (empty bins omitted, bins in order).
    """
    metrics = list(metrics) if metrics is not None else [m for m in DEFAULT_METRICS if m in df_scores.columns]
    needed = ["time_gap_months", "prediction_gap_months", "relative_position", *metrics]
    missing = [c for c in needed if c not in df_scores.columns]
    if missing:
        raise LDAEError(f"triplet summary: scores table lacks column(s) {missing}")
    if not metrics:
        raise LDAEError(f"triplet summary: no metric column found (looked for {list(DEFAULT_METRICS)})")
    df = df_scores.copy()
    if "method" not in df.columns:
        df["method"] = "all"
    df["_time_gap"] = gap_bin(df["time_gap_months"].to_numpy(), time_gap_edges)
    df["_prediction_gap"] = gap_bin(df["prediction_gap_months"].to_numpy(), prediction_gap_edges)
    df["_position"] = pd.Categorical(df["relative_position"], categories=list(POSITIONS))

    def _means(g: pd.DataFrame) -> dict[str, float]:
        return {m: float(g[m].mean()) for m in metrics}

    out: dict[str, Any] = {}
    for method, g in df.groupby("method", sort=False):
        entry: dict[str, Any] = _means(g) | {"n_triplets": len(g)}
        for key, col in (
            ("by_time_gap", "_time_gap"),
            ("by_prediction_gap", "_prediction_gap"),
            ("by_relative_position", "_position"),
        ):
            strata: dict[str, Any] = {}
            for level, sub in g.groupby(col, observed=True, sort=True):
                strata[str(level)] = _means(sub) | {"n": len(sub)}
            entry[key] = strata
        out[str(method)] = entry
    return out


# --------------------------------------------------------------------------------- paired comparisons
BOOTSTRAP_REPLICATES = 2000


def subject_bootstrap_mean_ci(values: Any, subject: Any, seed: int = 0, replicates: int = BOOTSTRAP_REPLICATES,
                              level: float = 0.95) -> list[float] | None:
    """Percentile interval of the mean of ``values`` over bootstrap samples of whole subjects.

    A subject's rows (its triplets) are resampled together, because they share the subject's anatomy and
    visits and are not independent. A replicate draws ``S`` subjects with replacement and takes
    ``Σ_drawn sum_s / Σ_drawn n_s`` (the mean over the drawn rows, each subject's rows as often as it was
    drawn). None with fewer than 2 subjects (no between-subject spread to resample)."""
    v = np.asarray(values, dtype=np.float64)
    uniq, inverse = np.unique(np.asarray(subject).astype(str), return_inverse=True)
    if len(uniq) < 2:
        return None
    sums = np.bincount(inverse, weights=v, minlength=len(uniq))
    counts = np.bincount(inverse, minlength=len(uniq)).astype(np.float64)
    drawn = np.random.default_rng(seed).integers(0, len(uniq), size=(int(replicates), len(uniq)))
    means = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)
    tail = 100 * (1 - level) / 2
    return [float(x) for x in np.percentile(means, [tail, 100 - tail])]


def _paired_stats(diff: np.ndarray, subject: np.ndarray, higher_is_better: bool, a: str, b: str,
                  seed: int) -> dict[str, Any]:
    """Mean paired difference ``a - b``, its subject-bootstrap 95 % interval and the winner (the method
    whose side of zero the whole interval lies on; None when the interval holds 0 or is undefined)."""
    ci = subject_bootstrap_mean_ci(diff, subject, seed=seed)
    winner = None
    if ci is not None and (ci[0] > 0 or ci[1] < 0):
        a_better = (ci[0] > 0) == higher_is_better
        winner = a if a_better else b
    return {"mean_difference": float(diff.mean()), "ci95": ci, "n_triplets": int(len(diff)),
            "n_subjects": int(len(set(subject.tolist()))), "winner": winner}


def compare_methods(
    df_scores: pd.DataFrame,
    methods: Sequence[str],
    metrics: Mapping[str, bool],
    seed: int = 0,
    time_gap_edges: Sequence[float] = DEFAULT_TIME_GAP_EDGES,
) -> list[dict[str, Any]]:
    """Paired comparisons of every pair of ``methods`` on the same triplets, overall and per time gap.

    ``df_scores`` is the per-(triplet, method) table that :func:`summarize_triplet_scores` summarises; ``metrics`` maps a
    metric column to True when higher is better (SSIM) or False (MSE). For each pair ``(a, b)`` in the
    order given (``a`` before ``b``) and each metric, the per-triplet difference ``a - b`` is averaged
    and given a 95 % interval by :func:`subject_bootstrap_mean_ci`; ``winner`` names the method the whole
    interval favours ("which beat which"), None when it holds zero. Returns one dict per (pair, metric):
    ``{"method", "versus", "metric", "higher_is_better", "mean_difference", "ci95", "n_triplets",
    "n_subjects", "winner", "by_time_gap": {bin: {the same statistics}}}``.
    """
    key = ["subject", "start_index", "target_index", "end_index"]
    missing = [c for c in (*key, "time_gap_months", "method", *metrics) if c not in df_scores.columns]
    if missing:
        raise LDAEError(f"method comparison: scores table lacks column(s) {missing}")
    present = [m for m in methods if (df_scores["method"] == m).any()]
    wide = {}
    for metric in metrics:
        wide[metric] = df_scores.pivot_table(index=key, columns="method", values=metric, aggfunc="first")
    gap_of = df_scores.drop_duplicates(key).set_index(key)["time_gap_months"]
    out: list[dict[str, Any]] = []
    for i, a in enumerate(present):
        for b in present[i + 1 :]:
            for metric, higher in metrics.items():
                table = wide[metric][[a, b]].dropna()
                if table.empty:
                    continue
                subject = np.asarray([k[0] for k in table.index]).astype(str)
                diff = (table[a] - table[b]).to_numpy(dtype=np.float64)
                entry = {"method": a, "versus": b, "metric": metric, "higher_is_better": bool(higher),
                         **_paired_stats(diff, subject, higher, a, b, seed)}
                gaps = gap_bin(gap_of.loc[table.index].to_numpy(), time_gap_edges)
                strata: dict[str, Any] = {}
                for level in gaps.cat.categories:
                    mask = (gaps == level).to_numpy()
                    if mask.any():
                        strata[str(level)] = _paired_stats(diff[mask], subject[mask], higher, a, b, seed)
                entry["by_time_gap"] = strata
                out.append(entry)
    return out
