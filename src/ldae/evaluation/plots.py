"""Evaluation figures (matplotlib, Agg): LDA scatter, triplet scores by gap/position, manipulation curves,
training curves from a Lightning CSV log. Every figure is written atomically as PNG and its path returned."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ldae.errors import LDAEError
from ldae.io import atomic_path

DIAGNOSIS_COLORS = {"CN": "tab:blue", "MCI": "tab:orange", "AD": "tab:red"}
STRATA = (
    ("by_time_gap", "time gap (months)"),
    ("by_prediction_gap", "prediction gap (months)"),
    ("by_relative_position", "relative position of target"),
)
_STEP_COLUMNS = ("step", "epoch")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    plt = _pyplot()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return Path(path)


def plot_lda(
    path: str | Path,
    projection: np.ndarray,
    diagnosis: Sequence[str],
    split: Sequence[str] | None = None,
    title: str = "LDA projection of y_sem",
) -> Path:
    """Scatter of a (n, 2) LDA projection coloured by diagnosis; test-split points drawn as crosses."""
    Z = np.asarray(projection, dtype=float)
    dx = np.asarray(diagnosis).astype(str)
    if Z.ndim != 2 or Z.shape[1] != 2 or len(dx) != len(Z):
        raise LDAEError(f"LDA plot: need an (n, 2) projection and n labels, got {Z.shape} and {len(dx)}")
    sp = np.asarray(split).astype(str) if split is not None else np.full(len(dx), "train")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    classes = [c for c in DIAGNOSIS_COLORS if c in set(dx)] + sorted(set(dx) - set(DIAGNOSIS_COLORS))
    for c in classes:
        for is_test, marker in ((False, "o"), (True, "x")):
            m = (dx == c) & ((sp == "test") == is_test)
            if m.any():
                label = f"{c} ({'test' if is_test else 'fit'})" if split is not None else c
                ax.scatter(
                    Z[m, 0], Z[m, 1], s=14, marker=marker, alpha=0.7, label=label, c=DIAGNOSIS_COLORS.get(c)
                )
    ax.set_xlabel("LD1")
    ax.set_ylabel("LD2")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)


def plot_triplet_scores(
    path: str | Path, summary: Mapping[str, Any], metric: str = "ssim", title: str | None = None
) -> Path:
    """One panel per stratification (time gap, prediction gap, relative position), one line per method,
    from :func:`ldae.evaluation.longitudinal.summarize_triplet_scores`; point labels give the counts."""
    if not summary:
        raise LDAEError("triplet plot: the summary is empty (no triplets)")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(STRATA), figsize=(4.2 * len(STRATA), 3.6), squeeze=False)
    for ax, (key, xlabel) in zip(axes[0], STRATA):
        levels: list[str] = []
        for entry in summary.values():
            levels += [lv for lv in entry.get(key, {}) if lv not in levels]
        x = np.arange(len(levels))
        for method, entry in summary.items():
            strata = entry.get(key, {})
            y = [strata[lv][metric] if lv in strata else np.nan for lv in levels]
            ax.plot(x, y, marker="o", label=f"{method} ({entry.get(metric, float('nan')):.3g})")
            for xi, lv in zip(x, levels):
                if lv in strata:
                    ax.annotate(str(strata[lv]["n"]), (xi, strata[lv][metric]), fontsize=6, alpha=0.6)
        ax.set_xticks(x, levels, fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric.upper())
    axes[0, 0].legend(fontsize=7, frameon=False, title="method (overall)", title_fontsize=7)
    fig.suptitle(
        title or f"missing-timepoint prediction: {metric.upper()} (n per point annotated)", fontsize=10
    )
    return _save(fig, path)


def plot_manipulation(
    path: str | Path,
    alphas: Sequence[float],
    changes: Mapping[str, Any],
    title: str = "manipulation along the AD-CN probe direction",
) -> Path:
    """Regional volume change (%) vs α, one line per region (e.g. ``{"ventricle": ..., "hippocampus": ...}``).

    Each value is (n_alpha,) or (n_scans, n_alpha); with several scans the mean is drawn with a ±1 SD band.
    """
    a = np.asarray(alphas, dtype=float)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for region, values in changes.items():
        v = np.atleast_2d(np.asarray(values, dtype=float))
        if v.shape[-1] != len(a):
            raise LDAEError(f"manipulation plot: '{region}' has {v.shape[-1]} values for {len(a)} alphas")
        mean = np.nanmean(v, axis=0)
        line = ax.plot(a, mean, marker="o", label=f"{region} (n={v.shape[0]})")[0]
        if v.shape[0] > 1:
            sd = np.nanstd(v, axis=0)
            ax.fill_between(a, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.axvline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("α (step along the probe direction)")
    ax.set_ylabel("volume change vs α = 0 (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)


def plot_training_curves(path: str | Path, metrics_csv: str | Path, title: str | None = None) -> Path:
    """Every numeric column of a Lightning ``metrics.csv`` against ``step`` (else ``epoch``, else row),
    one panel per column, NaN rows skipped (Lightning logs train/val on separate rows)."""
    import pandas as pd

    metrics_csv = Path(metrics_csv)
    if not metrics_csv.is_file():
        raise LDAEError(f"{metrics_csv}: training log not found")
    try:
        df = pd.read_csv(metrics_csv)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise LDAEError(f"{metrics_csv}: not a readable CSV log ({str(exc).splitlines()[0]})") from None
    xcol = next((c for c in _STEP_COLUMNS if c in df.columns), None)
    x_all = df[xcol].to_numpy(dtype=float) if xcol else np.arange(len(df), dtype=float)
    cols = [
        c
        for c in df.columns
        if c not in _STEP_COLUMNS and pd.api.types.is_numeric_dtype(df[c]) and df[c].notna().any()
    ]
    if not cols:
        raise LDAEError(f"{metrics_csv}: no numeric metric column to plot")
    n = len(cols)
    ncols = min(3, n)
    nrows = (n + ncols - 1) // ncols
    plt = _pyplot()
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols, 2.8 * nrows), squeeze=False)
    for ax, c in zip(axes.flat, cols):
        y = df[c].to_numpy(dtype=float)
        ok = np.isfinite(y) & np.isfinite(x_all)
        ax.plot(x_all[ok], y[ok], marker="." if ok.sum() < 50 else None, lw=1)
        ax.set_title(c, fontsize=9)
        ax.set_xlabel(xcol or "row", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title or f"training curves ({metrics_csv.name})", fontsize=10)
    return _save(fig, path)
