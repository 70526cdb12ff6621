"""Linear probes on frozen embeddings (paper §5.3): AD vs CN logistic regression and age ridge regression.

Protocol, identical for both probes:

* fit rows = rows whose ``split`` is in ``fit_splits`` (default ``("train",)``); report rows = ``test``;
* features standardised with the fit rows' mean/std (zero-variance features keep std 1);
* the regularisation strength (``C`` / ``alpha``) is chosen by cross-validation **grouped by subject**
  over the fit rows (``StratifiedGroupKFold`` for AD vs CN, ``GroupKFold`` for age; at most 5 folds), so
  no subject's sessions are on both sides of a validation split; the criterion is mean validation ROC-AUC
  (classification) or mean validation MAE (age); ties go to the stronger regularisation;
* the logistic fit is **class-balanced** (each class weighs half of the loss, ``class_weight="balanced"``),
  so a strongly regularised probe sits at P(AD) = 1/2, not at the training prior;
* the decision threshold on P(AD) is chosen by the same cross-validation: the out-of-fold P(AD) of every
  fit row at the chosen ``C`` is thresholded where the balanced accuracy ``(TPR + TNR) / 2`` (Youden's
  ``J = TPR + TNR - 1``, shifted) is highest (candidates: midpoints between consecutive distinct
  out-of-fold scores; ties go to the one nearest 1/2), and that threshold is applied to the test rows.
  Why: with the prior-weighted fit and a fixed 1/2, the tie rule toward strong regularisation put every
  P(AD) at the training prior (< 1/2), so accuracy/F1/MCC collapsed to "all CN" while the AUC was 0.84;
* the probe is refit on all fit rows with the chosen value and evaluated once on the test rows;
* test metrics carry a 95 % interval from a bootstrap over test *subjects* (a subject's sessions are
  resampled together: they are not independent), because a test split of a few dozen subjects moves
  the AUC by ±0.1 or more; the validation score at the chosen value (``cv_auc_best``/``cv_mae_best``)
  is reported beside it as a second, independent estimate.

The AD-vs-CN probe uses only CN and AD rows (MCI and any other label are dropped and counted in the
result); the positive class is AD. Its result also carries the probe direction in the *original*
embedding space (unit vector ``coef / std``: moving ``y_sem`` along it raises P(AD)) and the
standardisation used, so manipulation can reuse it. :func:`save_probes` / :func:`load_probes` store both
fitted probes as JSON (exact float round trip) for :func:`predict_probes` on new embeddings, together
with the weights fingerprint of the semantic encoder whose y_sem they were fitted on:
:func:`check_probes_fitted_on` refuses probes of another (retrained or foreign) representation checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ldae.errors import LDAEError
from ldae.io import write_json

POSITIVE = "AD"
NEGATIVE = "CN"
DEFAULT_CS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
DEFAULT_ALPHAS: tuple[float, ...] = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
MAX_FOLDS = 5
#: the logistic probe weighs each class by n / (2 n_class): a strongly regularised fit sits at P(AD) = 1/2
CLASS_WEIGHT = "balanced"
BOOTSTRAP_REPLICATES = 2000
PROBES_FORMAT = "ldae-probes-v1"
# Keys holding arrays (kept out of metrics tables by :func:`scalar_metrics`).
_ARRAY_KEYS = ("direction", "mean", "scale", "coef", "test_index", "test_score", "test_prediction")


# ----------------------------------------------------------------------------------------------- inputs
def _split_sizes(fit: np.ndarray, test: np.ndarray, fit_groups: Sequence, subjects: np.ndarray) -> dict[str, int]:
    """How many rows and subjects a probe was fitted and tested on (reported with every probe)."""
    return {"n_train": int(fit.sum()), "n_test": int(test.sum()), "n_train_subjects": len(set(fit_groups)),
            "n_test_subjects": len(set(subjects[test]))}


def _check_inputs(X: Any, columns: dict[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``X`` as a finite float64 (n, d) array and each column as a length-n array, or LDAEError."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise LDAEError(
            f"probe: embeddings must be a non-empty (n_samples, n_features) array, got shape {X.shape}"
        )
    if not np.isfinite(X).all():
        raise LDAEError(f"probe: embeddings hold {int((~np.isfinite(X)).sum())} NaN/inf value(s)")
    out = {}
    for name, values in columns.items():
        arr = np.asarray(values)
        if arr.shape != (X.shape[0],):
            raise LDAEError(
                f"probe: '{name}' has shape {arr.shape}, expected ({X.shape[0]},) to match the embeddings"
            )
        out[name] = arr
    split = out["split"].astype(str)
    if not np.isin(split, ("train", "val", "test")).all():
        bad = sorted(set(split) - {"train", "val", "test"})
        raise LDAEError(f"probe: unknown split value(s) {bad}; expected train/val/test")
    out["split"] = split
    out["subject"] = out["subject"].astype(str)
    return X, out


def _fit_test_masks(split: np.ndarray, fit_splits: Sequence[str], what: str) -> tuple[np.ndarray, np.ndarray]:
    fit = np.isin(split, list(fit_splits))
    test = split == "test"
    if not fit.any():
        raise LDAEError(f"{what}: no rows in split(s) {list(fit_splits)} to fit the probe on")
    if not test.any():
        raise LDAEError(f"{what}: no rows in the 'test' split to evaluate the probe on")
    return fit, test


def _n_folds(n_groups: int, what: str) -> int:
    if n_groups < 2:
        raise LDAEError(
            f"{what}: need at least 2 subjects per class in the fit split to choose the "
            f"regularisation by subject-grouped cross-validation, got {n_groups}"
        )
    return min(MAX_FOLDS, n_groups)


def _grouped_folds(groups: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train, validation) index folds with no subject on both sides. GroupKFold balances fold sizes
    deterministically; shuffling the group ids first makes the assignment seed-dependent."""
    from sklearn.model_selection import GroupKFold

    uniq = np.unique(groups)
    relabel = dict(zip(uniq, np.random.default_rng(seed).permutation(len(uniq))))
    ids = np.array([relabel[g] for g in groups])
    return list(GroupKFold(n_splits=k).split(np.zeros(len(ids)), groups=ids))


def _standardiser(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the fit rows (std 1 where a feature is constant, as scikit-learn does)."""
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale < 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0)] = 1.0
    return mean, scale


def _fit_standardised(model: Any, X: np.ndarray, y: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
    """``model`` fitted on ``X`` standardised with its own mean/scale; returns ``(model, mean, scale)``."""
    mean, scale = _standardiser(X)
    model.fit((X - mean) / scale, y)
    return model, mean, scale


def _cross_validate(grid: Sequence[float], folds: list[tuple[np.ndarray, np.ndarray]],
                    score: Callable[[np.ndarray, np.ndarray, float], float | None]) -> list[float]:
    """Mean validation score per grid value; ``score(train_idx, val_idx, value)`` returns None for a fold
    it cannot score (NaN when no fold could be scored)."""
    means = []
    for value in grid:
        scores = [s for tr, va in folds if (s := score(tr, va, value)) is not None]
        means.append(float(np.mean(scores)) if scores else float("nan"))
    return means


def _pick(grid: Sequence[float], scores: list[float], higher_is_better: bool, strongest_first: bool) -> float:
    """Best grid value; ties resolved toward the strongest regularisation."""
    order = range(len(grid)) if strongest_first else reversed(range(len(grid)))
    best_i, best = None, None
    for i in order:
        s = scores[i]
        if not np.isfinite(s):
            continue
        if best is None or (s > best + 1e-12 if higher_is_better else s < best - 1e-12):
            best_i, best = i, s
    if best_i is None:
        raise LDAEError("probe: cross-validation gave no finite score for any regularisation value")
    return float(grid[best_i])


# ------------------------------------------------------------------------------------------- AD vs CN
def rank_auc(y: np.ndarray, score: np.ndarray) -> float | None:
    """ROC-AUC as the Mann-Whitney U statistic (ties count one half); None unless both classes occur.
    Used inside the bootstrap, where it is ~10x faster than scikit-learn's curve-based routine."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def subject_bootstrap_ci(metric: Callable[[np.ndarray], float | None], subject: Any, seed: int = 0,
                         replicates: int = BOOTSTRAP_REPLICATES, level: float = 0.95) -> list[float] | None:
    """Percentile interval of ``metric(rows)`` over bootstrap samples of whole subjects.

    ``metric`` receives the row indices of one replicate (a resampled subject contributes all its rows,
    as often as it was drawn) and returns the statistic, or None where it is undefined (e.g. one class
    only); such replicates are redrawn implicitly by being skipped. None when fewer than half of the
    replicates are defined or there are fewer than 2 subjects.
    """
    subject = np.asarray(subject)
    uniq, inverse = np.unique(subject, return_inverse=True)
    if len(uniq) < 2:
        return None
    rows_of = [np.flatnonzero(inverse == i) for i in range(len(uniq))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(replicates)):
        drawn = rng.integers(0, len(uniq), size=len(uniq))
        value = metric(np.concatenate([rows_of[i] for i in drawn]))
        if value is not None:
            values.append(value)
    if len(values) < replicates / 2:
        return None
    tail = 100 * (1 - level) / 2
    return [float(v) for v in np.percentile(values, [tail, 100 - tail])]


def balanced_threshold(y: Any, score: Any) -> tuple[float, float]:
    """``(threshold, balanced accuracy)``: the cut on ``score`` (predict positive when ``score >= threshold``)
    that maximises the balanced accuracy ``(TPR + TNR) / 2`` on ``(y, score)``, i.e. Youden's J.

    Candidates are the midpoints between consecutive distinct scores (and one below/above all of them, which
    give 1/2); ties go to the candidate nearest 1/2, the class-balanced fit's neutral point, which is also
    kept when no cut beats chance (balanced accuracy 1/2). ``(0.5, nan)`` when ``y`` lacks a class.
    """
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.5, float("nan")
    u = np.unique(score)
    cands = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2, [u[-1] + 1.0]]) if len(u) > 1 else np.array([u[0]])
    pred = score[None, :] >= cands[:, None]
    bacc = 0.5 * ((pred & y).sum(axis=1) / n_pos + (~pred & ~y).sum(axis=1) / n_neg)
    if bacc.max() <= 0.5 + 1e-12:  # no cut beats chance out of fold: keep the balanced fit's neutral point
        return 0.5, float(bacc.max())
    best = np.flatnonzero(bacc >= bacc.max() - 1e-12)
    i = best[np.argmin(np.abs(cands[best] - 0.5))]
    return float(cands[i]), float(bacc[i])


def probe_ad_vs_cn(
    X: Any,
    diagnosis: Any,
    split: Any,
    subject: Any,
    seed: int = 0,
    Cs: Sequence[float] = DEFAULT_CS,
    fit_splits: Sequence[str] = ("train",),
    positive: str = POSITIVE,
    negative: str = NEGATIVE,
) -> dict[str, Any]:
    """Logistic-regression probe AD (positive) vs CN; metrics on the test split (see module docstring).

    Args:
        X: (n, d) embeddings, one row per scan.
        diagnosis, split, subject: per-row labels (split in train/val/test).
        seed: seeds the subject-grouped fold assignment.
        Cs: inverse regularisation strengths tried (smaller = stronger).
        fit_splits: splits the probe is fitted (and cross-validated) on.

    Returns:
        dict with accuracy, balanced_accuracy, precision, recall, f1, mcc (test, at ``threshold``: the
        cross-validated P(AD) cut, with its out-of-fold balanced accuracy ``threshold_cv_balanced_accuracy``),
        auc (test), n_train/n_test (+ subjects), the chosen ``C`` and per-C validation AUC, ``positive_class``, ``dropped`` (label -> rows), ``classes``,
        the model (``coef``/``intercept`` in standardised space, ``mean``/``scale``), the unit
        ``direction`` in the original space, and ``test_index``/``test_score`` (P(AD) per test row).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        f1_score,
        matthews_corrcoef,
        precision_score,
        recall_score,
        roc_auc_score,
    )
    from sklearn.model_selection import StratifiedGroupKFold

    what = "AD-vs-CN probe"
    X, cols = _check_inputs(X, {"diagnosis": diagnosis, "split": split, "subject": subject})
    dx = cols["diagnosis"].astype(str)
    keep = np.isin(dx, (positive, negative))
    dropped = {str(k): int(v) for k, v in zip(*np.unique(dx[~keep], return_counts=True))}
    fit, test = _fit_test_masks(cols["split"], fit_splits, what)
    fit &= keep
    test &= keep
    y = (dx == positive).astype(int)
    for name, mask, where in (
        (positive, 1, "fit"),
        (negative, 0, "fit"),
        (positive, 1, "test"),
        (negative, 0, "test"),
    ):
        rows = fit if where == "fit" else test
        if not (y[rows] == mask).any():
            splits = list(fit_splits) if where == "fit" else ["test"]
            raise LDAEError(
                f"{what}: no '{name}' rows in split(s) {splits}; both {negative} and {positive} are "
                f"needed (diagnoses present there: {sorted(set(dx[np.isin(cols['split'], splits)]))})"
            )

    Xf, yf, gf = X[fit], y[fit], cols["subject"][fit]
    n_sub = min(len(set(gf[yf == 1])), len(set(gf[yf == 0])))
    k = _n_folds(n_sub, what)
    folds = list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(Xf, yf, gf))

    def _fit(Xa: np.ndarray, ya: np.ndarray, C: float) -> tuple[LogisticRegression, np.ndarray, np.ndarray]:
        return _fit_standardised(LogisticRegression(C=C, max_iter=5000, random_state=seed, class_weight=CLASS_WEIGHT),
                                 Xa, ya)

    def _val_auc(tr: np.ndarray, va: np.ndarray, C: float) -> float | None:
        if len(np.unique(yf[tr])) < 2 or len(np.unique(yf[va])) < 2:
            return None
        clf, mean, scale = _fit(Xf[tr], yf[tr], C)
        return float(roc_auc_score(yf[va], clf.decision_function((Xf[va] - mean) / scale)))

    cv_auc = _cross_validate(Cs, folds, _val_auc)
    best_C = _pick(Cs, cv_auc, higher_is_better=True, strongest_first=True)

    oof = np.full(len(yf), np.nan)
    for tr, va in folds:
        if len(np.unique(yf[tr])) < 2:
            continue
        fold_clf, fold_mean, fold_scale = _fit(Xf[tr], yf[tr], best_C)
        oof[va] = fold_clf.predict_proba((Xf[va] - fold_mean) / fold_scale)[:, 1]
    scored = np.isfinite(oof)
    threshold, cv_bacc = balanced_threshold(yf[scored], oof[scored])

    clf, mean, scale = _fit(Xf, yf, best_C)
    coef = clf.coef_[0].astype(np.float64)
    intercept = float(clf.intercept_[0])
    raw = coef / scale
    norm = float(np.linalg.norm(raw))
    direction = raw / norm if norm > 0 else raw
    Xt, yt = X[test], y[test]
    score = clf.predict_proba((Xt - mean) / scale)[:, 1]
    pred = (score >= threshold).astype(int)

    def _boot_auc(rows: np.ndarray) -> float | None:
        return rank_auc(yt[rows], score[rows])

    return {
        "positive_class": positive,
        "negative_class": negative,
        "classes": [negative, positive],
        "dropped": dropped,
        "accuracy": float(accuracy_score(yt, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(yt, pred)),
        "precision": float(precision_score(yt, pred, zero_division=0)),
        "recall": float(recall_score(yt, pred, zero_division=0)),
        "f1": float(f1_score(yt, pred, zero_division=0)),
        "mcc": float(matthews_corrcoef(yt, pred)),
        "auc": float(roc_auc_score(yt, score)),
        "auc_ci95": subject_bootstrap_ci(_boot_auc, cols["subject"][test], seed=seed),
        **_split_sizes(fit, test, gf, cols["subject"]),
        "C": best_C,
        "cv_auc": {repr(float(c)): a for c, a in zip(Cs, cv_auc)},
        "cv_auc_best": cv_auc[list(Cs).index(best_C)],
        "selection": f"StratifiedGroupKFold({k}) by subject over {list(fit_splits)} rows, mean validation ROC-AUC",
        "threshold": threshold,
        "threshold_cv_balanced_accuracy": cv_bacc,
        "threshold_selection": f"class-balanced fit; P(AD) threshold maximising the balanced accuracy of the "
                               f"out-of-fold scores of the same StratifiedGroupKFold({k}) at the chosen C",
        "coef": coef,
        "intercept": intercept,
        "mean": mean,
        "scale": scale,
        "direction": direction,
        "test_index": np.flatnonzero(test),
        "test_score": score,
    }


# ------------------------------------------------------------------------------------------------ age
def probe_age(
    X: Any,
    age: Any,
    split: Any,
    subject: Any,
    seed: int = 0,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    fit_splits: Sequence[str] = ("train",),
) -> dict[str, Any]:
    """Ridge-regression age probe on all diagnoses; MAE and RMSE (years) on the test split.

    ``alpha`` is chosen by ``GroupKFold`` by subject over the fit rows (mean validation MAE); ``seed``
    shuffles the subject-to-fold assignment. Returns the metrics, chosen ``alpha`` and per-alpha validation
    MAE, the model (``coef``/``intercept`` in standardised space, ``mean``/``scale``) and
    ``test_index``/``test_prediction``.
    """
    return probe_regression(X, age, split, subject, seed=seed, alphas=alphas, fit_splits=fit_splits,
                            what="age probe", target="age")


def _ridge_nested_cv(
    Xf: np.ndarray, Yf: np.ndarray, gf: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]],
    alphas: Sequence[float], seed: int, val_loss: Callable[[np.ndarray, np.ndarray], float],
) -> tuple[float, list[float], np.ndarray]:
    """The ridge protocol shared by :func:`probe_regression` and :func:`probe_latent_readout` on the fit
    rows ``Xf`` / ``Yf`` (targets ``(n,)`` or ``(n, p)``) grouped by subject ``gf``.

    Returns ``(best_alpha, scores, oof)``: the alpha of lowest mean ``val_loss(prediction, truth)`` over
    ``folds`` (ties toward the stronger penalty: :func:`_pick` scans the grid from its largest alpha), the mean
    validation loss per alpha, and nested out-of-fold predictions: each outer fold's alpha chosen again by
    an inner GroupKFold of its training rows (``seed + 1``), so no prediction saw its own row (NaN rows left
    when an outer fold's training rows hold fewer than 2 subjects)."""
    from sklearn.linear_model import Ridge

    def choose(rows: np.ndarray, inner: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, list[float]]:
        def score(tr: np.ndarray, va: np.ndarray, alpha: float) -> float:
            reg, mean, scale = _fit_standardised(Ridge(alpha=alpha), Xf[rows[tr]], Yf[rows[tr]])
            return val_loss(reg.predict((Xf[rows[va]] - mean) / scale), Yf[rows[va]])

        scores = _cross_validate(alphas, inner, score)
        return _pick(alphas, scores, higher_is_better=False, strongest_first=False), scores

    best_alpha, scores = choose(np.arange(len(Yf)), folds)
    oof = np.full(Yf.shape, np.nan)
    for tr, va in folds:
        n_inner = len(set(gf[tr]))
        if n_inner < 2:
            break
        alpha, _ = choose(tr, _grouped_folds(gf[tr], min(MAX_FOLDS, n_inner), seed + 1))
        reg, mean, scale = _fit_standardised(Ridge(alpha=alpha), Xf[tr], Yf[tr])
        oof[va] = reg.predict((Xf[va] - mean) / scale)
    return best_alpha, scores, oof


def probe_regression(
    X: Any,
    values: Any,
    split: Any,
    subject: Any,
    seed: int = 0,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    fit_splits: Sequence[str] = ("train",),
    what: str = "regression probe",
    target: str = "target",
) -> dict[str, Any]:
    """Ridge probe of any numeric per-row ``values`` named ``target`` (age, a regional volume): the protocol of
    :func:`probe_age`, whose result it returns, plus ``r2`` on the test split (1 - SSE/SST with the test
    mean: how much of the target's test variance the embedding explains; negative = worse than a constant)
    and ``cv_r2``, a second estimate from the fit rows alone: nested subject-grouped CV, i.e. the same
    outer folds as the alpha choice, each outer fold's alpha chosen again by an inner GroupKFold of its
    training rows, the out-of-fold predictions pooled, ``1 - SSE/SST`` with the fit rows' mean (None when
    an outer fold's training rows hold fewer than 2 subjects). On the demo's test split of 24 subjects the
    test R² of a weak factor moves by up to ~0.3 between runs; the nested estimate pools the train split's
    86 subjects.
    """
    from sklearn.linear_model import Ridge

    X, cols = _check_inputs(X, {target: values, "split": split, "subject": subject})
    try:
        y = cols[target].astype(np.float64)
    except ValueError:
        raise LDAEError(f"{what}: {target} values must be numeric") from None
    if not np.isfinite(y).all():
        raise LDAEError(f"{what}: {target} holds {int((~np.isfinite(y)).sum())} NaN/inf value(s)")
    fit, test = _fit_test_masks(cols["split"], fit_splits, what)
    Xf, yf, gf = X[fit], y[fit], cols["subject"][fit]
    k = _n_folds(len(set(gf)), what)
    folds = _grouped_folds(gf, k, seed)

    # alpha by mean validation MAE; nested CV R² from out-of-fold predictions that never saw their own rows
    best_alpha, cv_mae, oof = _ridge_nested_cv(Xf, yf, gf, folds, alphas, seed,
                                               lambda pred, truth: float(np.mean(np.abs(pred - truth))))
    sst_fit = float(np.sum((yf - yf.mean()) ** 2))
    cv_r2 = (1.0 - float(np.sum((oof - yf) ** 2)) / sst_fit
             if np.isfinite(oof).all() and sst_fit > 0 else None)

    reg, mean, scale = _fit_standardised(Ridge(alpha=best_alpha), Xf, yf)
    pred = reg.predict((X[test] - mean) / scale)
    err = pred - y[test]
    sst = float(np.sum((y[test] - y[test].mean()) ** 2))
    return {
        "mae": float(np.mean(np.abs(err))),
        "mae_ci95": subject_bootstrap_ci(lambda rows: float(np.mean(np.abs(err[rows]))), cols["subject"][test],
                                         seed=seed),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "r2": 1.0 - float(np.sum(err**2)) / sst if sst > 0 else None,
        "cv_r2": cv_r2,
        **_split_sizes(fit, test, gf, cols["subject"]),
        "alpha": best_alpha,
        "cv_mae": {repr(float(a)): m for a, m in zip(alphas, cv_mae)},
        "cv_mae_best": cv_mae[list(alphas).index(best_alpha)],
        "selection": f"GroupKFold({k}) by subject over {list(fit_splits)} rows, mean validation MAE",
        "coef": np.asarray(reg.coef_, dtype=np.float64),
        "intercept": float(reg.intercept_),
        "mean": mean,
        "scale": scale,
        "test_index": np.flatnonzero(test),
        "test_prediction": pred,
    }


def probe_latent_readout(
    X: Any,
    latents: Any,
    split: Any,
    subject: Any,
    seed: int = 0,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    fit_splits: Sequence[str] = ("train",),
    what: str = "latent read-out",
) -> dict[str, Any]:
    """How much of the autoencoder latent an embedding holds, linearly: a multi-output ridge from ``X``
    ``(n, d)`` to the flattened latents ``(n, p)``, the protocol of :func:`probe_regression` with the
    criterion summed over every latent element.

    ``r2 = 1 − Σ‖z − ẑ‖² / Σ‖z − z̄_test‖²`` over the test rows (the share of the latents' between-scan
    variation the embedding reproduces), and ``cv_r2`` the same from nested subject-grouped CV over the fit
    rows (outer folds as the alpha choice, alpha chosen again inside each; pooled out-of-fold predictions,
    SST around the fit rows' mean). The alpha has the lowest mean validation squared error.

    Why: the stage-3 encoder is trained on the fit rows. ``cv_r2`` well above ``r2`` means its y_sem
    reproduces the *training* scans' latents but not new ones (the encoder memorises); for latent PCA
    (fitted on the same rows, linear) the two stay close. Both far below latent PCA's means y_sem holds
    less of the scan than its linear compression (what the factor probes then show factor by factor).
    """
    from sklearn.linear_model import Ridge

    X, cols = _check_inputs(X, {"split": split, "subject": subject})
    Z = np.asarray(latents, dtype=np.float64).reshape(len(latents), -1)
    if len(Z) != len(X):
        raise LDAEError(f"{what}: {len(X)} embedding rows but {len(Z)} latents")
    if not np.isfinite(Z).all():
        raise LDAEError(f"{what}: the latents hold {int((~np.isfinite(Z)).sum())} NaN/inf value(s)")
    fit, test = _fit_test_masks(cols["split"], fit_splits, what)
    Xf, Zf, gf = X[fit], Z[fit], cols["subject"][fit]
    k = _n_folds(len(set(gf)), what)
    folds = _grouped_folds(gf, k, seed)

    best_alpha, _, oof = _ridge_nested_cv(Xf, Zf, gf, folds, alphas, seed,
                                          lambda pred, truth: float(np.mean((pred - truth) ** 2)))
    sst_fit = float(np.sum((Zf - Zf.mean(axis=0)) ** 2))
    cv_r2 = (1.0 - float(np.sum((oof - Zf) ** 2)) / sst_fit
             if np.isfinite(oof).all() and sst_fit > 0 else None)
    reg, mean, scale = _fit_standardised(Ridge(alpha=best_alpha), Xf, Zf)
    pred = reg.predict((X[test] - mean) / scale)
    sst = float(np.sum((Z[test] - Z[test].mean(axis=0)) ** 2))
    return {"r2": 1.0 - float(np.sum((pred - Z[test]) ** 2)) / sst if sst > 0 else None, "cv_r2": cv_r2,
            "alpha": best_alpha, **_split_sizes(fit, test, gf, cols["subject"]),
            "selection": f"GroupKFold({k}) by subject over {list(fit_splits)} rows, mean validation squared error"}


def scalar_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """A probe result without its arrays (for metrics.json / tables)."""
    return {k: v for k, v in result.items() if k not in _ARRAY_KEYS}


# ----------------------------------------------------------------------------------------- latent PCA
def pca_features(X: Any, fit_mask: Any, k: int) -> np.ndarray:
    """Scores ``(n, k')`` of every row on the first ``k' = min(k, n_fit - 1, d)`` principal axes of the
    ``fit_mask`` rows (centred on their mean; nothing of the other rows is used to fit).

    Why: a linear probe on the principal components of the autoencoder's latents is the reference for
    what the compressed latent itself carries, linearly, about a label at the preset's resolution; y_sem
    should match or beat it with far fewer dimensions.
    """
    X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
    mask = np.asarray(fit_mask, bool)
    if mask.shape != (X.shape[0],) or mask.sum() < 2:
        raise LDAEError(f"latent PCA: need at least 2 fit rows among {X.shape[0]}, got {int(mask.sum())}")
    if int(k) < 1:
        raise LDAEError(f"latent PCA: the number of components must be >= 1, got {k}")
    mean = X[mask].mean(axis=0)
    _, _, vt = np.linalg.svd(X[mask] - mean, full_matrices=False)
    k = min(int(k), int(mask.sum()) - 1, X.shape[1])
    return (X - mean) @ vt[:k].T


# ------------------------------------------------------------------------------------------------ LDA
def lda_projection(X: Any, diagnosis: Any, fit_mask: Any | None = None) -> np.ndarray:
    """2D linear-discriminant projection (n, 2) of the embeddings for a scatter plot.

    Fitted on the rows of ``fit_mask`` (default all rows; pass the train split to avoid optimism) and
    applied to all rows. Needs at least 3 diagnosis classes among the fit rows (e.g. CN/MCI/AD).
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    X = np.asarray(X, dtype=np.float64)
    dx = np.asarray(diagnosis).astype(str)
    if X.ndim != 2 or dx.shape != (X.shape[0],):
        raise LDAEError(f"LDA projection: need (n, d) embeddings and n labels, got {X.shape} and {dx.shape}")
    mask = np.ones(len(dx), bool) if fit_mask is None else np.asarray(fit_mask, bool)
    classes = np.unique(dx[mask])
    if len(classes) < 3:
        raise LDAEError(f"LDA projection: needs 3 diagnosis classes for 2 components, got {list(classes)}")
    lda = LinearDiscriminantAnalysis(n_components=2, solver="svd")
    lda.fit(X[mask], dx[mask])
    return lda.transform(X)


# --------------------------------------------------------------------------------------- persistence
def _model_part(result: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    missing = [k for k in keys if k not in result]
    if missing:
        raise LDAEError(
            f"save_probes: probe result lacks {missing}; pass the dict returned by the probe function"
        )
    return {
        k: (np.asarray(result[k]).tolist() if isinstance(result[k], np.ndarray) else result[k]) for k in keys
    }


def save_probes(path: str | Path, ad_vs_cn: dict[str, Any], age: dict[str, Any],
                encoder_fingerprint: str | None = None, representation_checkpoint: str | Path | None = None) -> Path:
    """Atomically write both fitted probes as JSON (coefficients, intercepts, standardisation, classes,
    chosen hyper-parameters, test metrics) for :func:`predict_probes`, with the weights fingerprint of
    the semantic encoder they were fitted on (``LDAE.fingerprints['semantic_encoder']``) and the
    representation checkpoint it came from (informational)."""
    ad_keys = (
        "coef",
        "intercept",
        "mean",
        "scale",
        "direction",
        "classes",
        "positive_class",
        "C",
        "threshold",
    )
    age_keys = ("coef", "intercept", "mean", "scale", "alpha")
    metric_keys = ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "mcc", "auc", "mae", "rmse", "n_train", "n_test")
    obj = {
        "format": PROBES_FORMAT,
        "ad_vs_cn": _model_part(ad_vs_cn, ad_keys)
        | {"metrics": {k: ad_vs_cn[k] for k in metric_keys if k in ad_vs_cn}},
        "age": _model_part(age, age_keys) | {"metrics": {k: age[k] for k in metric_keys if k in age}},
    }
    if encoder_fingerprint is not None:
        obj["encoder_fingerprint"] = str(encoder_fingerprint)
    if representation_checkpoint is not None:
        obj["representation_checkpoint"] = str(representation_checkpoint)
    return write_json(path, obj)


def load_probes(path: str | Path) -> dict[str, Any]:
    """Read probes written by :func:`save_probes`; arrays back as float64 numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise LDAEError(f"{path}: probes file not found")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LDAEError(f"{path}: not a readable probes JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != PROBES_FORMAT:
        raise LDAEError(f"{path}: not an ldae probes file (expected format '{PROBES_FORMAT}')")
    for part in ("ad_vs_cn", "age"):
        if part not in obj:
            raise LDAEError(f"{path}: probes file lacks the '{part}' probe")
        for key in ("coef", "mean", "scale", "direction"):
            if key in obj[part]:
                obj[part][key] = np.asarray(obj[part][key], dtype=np.float64)
    return obj


def check_probes_fitted_on(probes: dict[str, Any], encoder_fingerprint: str, source: str | Path | None = None) -> bool:
    """LDAEError (one line) when ``probes`` were fitted on another semantic encoder than the one with
    weights fingerprint ``encoder_fingerprint`` (stale probes of a retrained run, or another run's).
    Returns False, after a logged warning, for probes written before fingerprints were recorded (they
    cannot be checked), True when they match."""
    import logging

    recorded = probes.get("encoder_fingerprint")
    name = source or "probes"
    if not recorded:
        logging.getLogger(__name__).warning(
            "%s: the probes do not record which representation checkpoint they were fitted on, so they cannot "
            "be checked against this model; rerun `ldae evaluate` to tie them to it", name)
        return False
    if recorded != encoder_fingerprint:
        fitted = probes.get("representation_checkpoint")
        on = f" ({fitted})" if fitted else ""
        raise LDAEError(f"{name}: the probes were fitted on another representation checkpoint{on} than this "
                        "model's (semantic encoder weights fingerprint differs): rerun `ldae evaluate` on this "
                        "run or pass its own --probes")
    return True


def predict_probes(probes: dict[str, Any], X: Any) -> tuple[np.ndarray, np.ndarray]:
    """P(AD) and estimated age for new embeddings ``X`` (n, d) with probes from :func:`load_probes`."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[None]
    out = []
    for part in ("ad_vs_cn", "age"):
        p = probes[part]
        d = len(p["coef"])
        if X.ndim != 2 or X.shape[1] != d:
            raise LDAEError(
                f"predict_probes: embeddings have shape {X.shape}, the {part} probe expects (n, {d})"
            )
        out.append(((X - p["mean"]) / p["scale"]) @ p["coef"] + p["intercept"])
    logit, age = out
    return 1.0 / (1.0 + np.exp(-logit)), age
