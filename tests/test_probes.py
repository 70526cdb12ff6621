"""Linear probes: planted-signal recovery, AUC against a brute-force pair count, noise control,
save/load round trip, LDA projection and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from ldae.errors import LDAEError
from ldae.evaluation.probes import (
    lda_projection,
    load_probes,
    pca_features,
    predict_probes,
    probe_ad_vs_cn,
    probe_age,
    rank_auc,
    save_probes,
    scalar_metrics,
    subject_bootstrap_ci,
)


def _cohort(n_subjects: int = 90, sessions: int = 2, d: int = 16, signal: float = 2.0, seed: int = 0):
    """Synthetic embeddings with a planted AD direction ``w`` (in the original, anisotropic space) and an
    age direction ``v``; sessions of a subject share their subject-level noise."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    w /= np.linalg.norm(w)
    v = rng.normal(size=d)
    v -= (v @ w) * w
    v /= np.linalg.norm(v)
    scales = np.exp(rng.uniform(-0.5, 0.5, size=d))  # anisotropic features: standardisation matters
    dx_choices = np.array(["CN", "MCI", "AD"])
    rows = []
    for s in range(n_subjects):
        dx = dx_choices[s % 3]
        split = "test" if s % 5 == 0 else ("val" if s % 5 == 1 else "train")
        base = rng.normal(size=d)
        age0 = rng.uniform(60, 85)
        for k in range(sessions):
            age = age0 + k
            e = base + 0.3 * rng.normal(size=d)
            e -= (e @ w) * w + (e @ v) * v  # signal-free part orthogonal to both directions
            level = {"CN": -1.0, "MCI": 0.0, "AD": 1.0}[dx]
            e = e + (signal * level + 0.5 * rng.normal()) * w + ((age - 72.5) / 5.0 + 0.05 * rng.normal()) * v
            rows.append((f"s{s:03d}", dx, split, age, e))
    subject, dx, split, age, X = map(np.array, zip(*rows))
    # the planted direction lives in the rescaled space: x = e * scales  ->  logit direction w / scales
    return X * scales, dx, split, age, subject, (w / scales) / np.linalg.norm(w / scales)


def _brute_auc(y: np.ndarray, score: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie) over all positive-negative pairs."""
    pos, neg = score[y == 1], score[y == 0]
    total = 0.0
    for p in pos:
        for q in neg:
            total += 1.0 if p > q else (0.5 if p == q else 0.0)
    return total / (len(pos) * len(neg))


def test_planted_signal_recovered_and_auc_matches_brute_force() -> None:
    X, dx, split, age, subject, w = _cohort()
    res = probe_ad_vs_cn(X, dx, split, subject, seed=0)
    assert res["positive_class"] == "AD" and res["dropped"] == {"MCI": int((dx == "MCI").sum())}
    assert res["auc"] > 0.95 and res["accuracy"] > 0.85
    assert float(np.dot(res["direction"], w)) > 0.9
    assert abs(np.linalg.norm(res["direction"]) - 1) < 1e-12
    assert res["n_test"] == int(((split == "test") & (dx != "MCI")).sum())
    assert res["n_train"] == int(((split == "train") & (dx != "MCI")).sum())

    idx = res["test_index"]
    y = (dx[idx] == "AD").astype(int)
    assert res["auc"] == pytest.approx(_brute_auc(y, res["test_score"]), abs=1e-12)
    # the direction is the logit gradient: moving along it raises P(AD)
    probes = {"ad_vs_cn": res, "age": probe_age(X, age, split, subject)}
    p0, _ = predict_probes(probes, X[idx])
    p1, _ = predict_probes(probes, X[idx] + 0.1 * res["direction"])
    assert (p1 > p0).all()
    np.testing.assert_allclose(p0, res["test_score"], rtol=1e-10, atol=1e-12)
    # metrics from the confusion matrix, computed by hand
    pred = (res["test_score"] >= res["threshold"]).astype(int)
    tp, tn = int(((pred == 1) & (y == 1)).sum()), int(((pred == 0) & (y == 0)).sum())
    fp, fn = int(((pred == 1) & (y == 0)).sum()), int(((pred == 0) & (y == 1)).sum())
    assert res["recall"] == pytest.approx(tp / (tp + fn))
    assert res["precision"] == pytest.approx(tp / (tp + fp))
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert res["mcc"] == pytest.approx(mcc)
    assert "direction" not in scalar_metrics(res) and "auc" in scalar_metrics(res)


def test_age_probe_recovers_planted_age() -> None:
    X, dx, split, age, subject, _ = _cohort()
    res = probe_age(X, age, split, subject, seed=0)
    assert res["mae"] < 1.0  # ages span 60-86 years; noise on the age coordinate is 0.25 years
    assert res["rmse"] >= res["mae"]
    err = res["test_prediction"] - age[res["test_index"]]
    assert res["rmse"] == pytest.approx(float(np.sqrt(np.mean(err**2))))
    assert res["alpha"] in (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


def test_noise_gives_chance_auc() -> None:
    rng = np.random.default_rng(1)
    X, dx, split, age, subject, _ = _cohort(n_subjects=150, signal=0.0)
    X = rng.normal(size=X.shape)  # pure noise: no information at all
    aucs = [probe_ad_vs_cn(X, dx, split, subject, seed=s)["auc"] for s in range(2)]
    # ~40 test scans: the AUC of a random scorer has sd ~0.09
    assert all(abs(a - 0.5) < 0.22 for a in aucs), aucs


def test_save_load_round_trip_identical_predictions(tmp_path) -> None:
    X, dx, split, age, subject, _ = _cohort()
    ad, ag = probe_ad_vs_cn(X, dx, split, subject), probe_age(X, age, split, subject)
    path = save_probes(tmp_path / "probes.json", ad, ag)
    loaded = load_probes(path)
    X_new = np.random.default_rng(3).normal(size=(7, X.shape[1]))
    p_a, a_a = predict_probes({"ad_vs_cn": ad, "age": ag}, X_new)
    p_b, a_b = predict_probes(loaded, X_new)
    np.testing.assert_array_equal(p_a, p_b)
    np.testing.assert_array_equal(a_a, a_b)
    assert loaded["ad_vs_cn"]["positive_class"] == "AD" and loaded["ad_vs_cn"]["C"] == ad["C"]
    assert loaded["age"]["alpha"] == ag["alpha"]
    # the age prediction equals scikit-learn's on the test rows
    np.testing.assert_allclose(
        predict_probes(loaded, X[ag["test_index"]])[1], ag["test_prediction"], rtol=1e-10
    )
    with pytest.raises(LDAEError, match="expects"):
        predict_probes(loaded, X_new[:, :3])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(LDAEError, match="bad.json"):
        load_probes(tmp_path / "bad.json")


def test_missing_class_errors() -> None:
    X, dx, split, age, subject, _ = _cohort()
    no_ad_test = dx.copy()
    no_ad_test[(split == "test") & (dx == "AD")] = "MCI"
    with pytest.raises(LDAEError, match=r"no 'AD' rows in split\(s\) \['test'\]"):
        probe_ad_vs_cn(X, no_ad_test, split, subject)
    no_cn_train = dx.copy()
    no_cn_train[(split == "train") & (dx == "CN")] = "AD"
    with pytest.raises(LDAEError, match=r"no 'CN' rows in split\(s\) \['train'\]"):
        probe_ad_vs_cn(X, no_cn_train, split, subject)
    with pytest.raises(LDAEError, match="no rows in the 'test' split"):
        probe_age(X, age, np.where(split == "test", "val", split), subject)
    with pytest.raises(LDAEError, match="shape"):
        probe_age(X, age[:-1], split, subject)
    with pytest.raises(LDAEError, match="NaN"):
        probe_ad_vs_cn(np.where(X > 2, np.nan, X), dx, split, subject)


def test_lda_projection_separates_classes() -> None:
    X, dx, split, age, subject, w = _cohort()
    Z = lda_projection(X, dx, fit_mask=split == "train")
    assert Z.shape == (len(X), 2)
    means = {c: Z[dx == c, 0].mean() for c in ("CN", "MCI", "AD")}
    # the first discriminant orders the classes along the planted axis (sign is arbitrary)
    assert (means["CN"] < means["MCI"] < means["AD"]) or (means["CN"] > means["MCI"] > means["AD"])
    with pytest.raises(LDAEError, match="3 diagnosis classes"):
        lda_projection(X[dx != "MCI"], dx[dx != "MCI"])


def test_lda_plot_writes_png(tmp_path) -> None:
    from ldae.evaluation.plots import plot_lda

    X, dx, split, age, subject, _ = _cohort()
    path = plot_lda(tmp_path / "figs" / "lda.png", lda_projection(X, dx, split == "train"), dx, split)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert [p.name for p in path.parent.iterdir()] == ["lda.png"]  # no temporary file left behind


def test_rank_auc_matches_brute_force_pair_count_with_ties() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        y = rng.integers(0, 2, size=40)
        score = np.round(rng.normal(size=40), 1)  # rounded: many ties
        assert rank_auc(y, score) == pytest.approx(_brute_auc(y, score), abs=1e-12)
    assert rank_auc(np.ones(5), np.arange(5.0)) is None


def test_subject_bootstrap_resamples_whole_subjects() -> None:
    """The interval is over subjects: repeating every subject's rows (more sessions, no more subjects)
    leaves it unchanged, whereas more subjects narrow it; a perfect separation gives [1, 1]."""
    rng = np.random.default_rng(0)
    n = 30
    y = np.arange(n) % 2
    score = y * 0.7 + rng.normal(size=n)
    subject = np.arange(n)
    ci = subject_bootstrap_ci(lambda r: rank_auc(y[r], score[r]), subject, seed=1)
    assert ci is not None and ci[0] < rank_auc(y, score) < ci[1]
    rep = np.repeat(np.arange(n), 3)  # each subject seen 3 times
    ci_rep = subject_bootstrap_ci(lambda r: rank_auc(y[rep][r], score[rep][r]), subject[rep], seed=1)
    assert ci_rep == pytest.approx(ci, abs=1e-12)
    big = 8 * n
    yb = np.arange(big) % 2
    sb = yb * 0.7 + rng.normal(size=big)
    ci_big = subject_bootstrap_ci(lambda r: rank_auc(yb[r], sb[r]), np.arange(big), seed=1)
    assert ci_big[1] - ci_big[0] < 0.6 * (ci[1] - ci[0])
    assert subject_bootstrap_ci(lambda r: rank_auc(y[r], y[r] + 0.0), subject) == [1.0, 1.0]
    assert subject_bootstrap_ci(lambda r: 0.0, np.zeros(4)) is None  # one subject: no interval


def test_probes_report_intervals_and_validation_scores() -> None:
    X, dx, split, age, subject, _ = _cohort(signal=0.4)  # weak: the test AUC is below 1
    ad = probe_ad_vs_cn(X, dx, split, subject, seed=0)
    lo, hi = ad["auc_ci95"]
    assert lo <= ad["auc"] <= hi and hi - lo > 0
    assert ad["cv_auc_best"] == ad["cv_auc"][repr(ad["C"])]
    ag = probe_age(X, age, split, subject, seed=0)
    lo, hi = ag["mae_ci95"]
    assert lo <= ag["mae"] <= hi
    assert ag["cv_mae_best"] == ag["cv_mae"][repr(ag["alpha"])]


def test_regression_probe_r2_matches_scikit_learn_on_the_test_rows() -> None:
    from sklearn.metrics import r2_score

    from ldae.evaluation.probes import probe_regression

    X, dx, split, age, subject, w = _cohort(signal=1.0)
    target = X @ w * 10.0 + 3.0  # exactly linear in the embeddings
    r = probe_regression(X, target, split, subject, target="volume")
    test = split == "test"
    assert r["r2"] == pytest.approx(r2_score(target[test], r["test_prediction"]), abs=1e-12)
    assert r["r2"] > 0.99
    noise = np.random.default_rng(5).normal(size=len(target))
    assert probe_regression(X, noise, split, subject)["r2"] < 0.1
    with pytest.raises(LDAEError, match="volume holds 1 NaN"):
        probe_regression(X, np.where(np.arange(len(target)) == 3, np.nan, target), split, subject, target="volume")


def test_pca_features_match_scikit_learn_fitted_on_the_fit_rows_only() -> None:
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 30)) * np.linspace(3.0, 0.1, 30)  # distinct variances: a well-defined basis
    fit = np.arange(40) < 25
    ours = pca_features(X, fit, 5)
    ref = PCA(5, svd_solver="full").fit(X[fit]).transform(X)
    signs = np.sign((ours * ref).sum(axis=0))  # principal axes are defined up to sign
    np.testing.assert_allclose(ours * signs, ref, atol=1e-9)
    X_other = X.copy()
    X_other[~fit] += 100.0  # rows outside the fit set move: their scores move, the basis does not
    np.testing.assert_allclose(pca_features(X_other, fit, 5)[fit], ours[fit], atol=1e-9)
    assert pca_features(X, fit, 99).shape == (40, 24)  # at most n_fit - 1 components
    with pytest.raises(LDAEError, match="at least 2 fit rows"):
        pca_features(X, np.arange(40) == 0, 3)


def _imbalanced_weak_cohort(seed: int = 3):
    """One informative feature, AD:CN = 1:3 per split, weak signal: every C gives the same ranking (the CV AUC
    ties, so the old rule took the strongest C = 1e-4) and P(AD) of an unweighted fit sits at the prior."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(160):
        dx = "AD" if s % 4 == 0 else "CN"
        split = "test" if s % 5 == 0 else "train"
        level = 1.0 if dx == "AD" else 0.0
        for _ in range(2):
            rows.append((f"s{s:03d}", dx, split, level + 0.8 * rng.normal()))
    subject, dx, split, x = map(np.array, zip(*rows))
    return x[:, None], dx, split, subject


def test_collapse_case_thresholded_metrics_are_not_degenerate() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, f1_score, matthews_corrcoef, recall_score, roc_curve
    from sklearn.model_selection import StratifiedGroupKFold

    X, dx, split, subject = _imbalanced_weak_cohort()
    y = (dx == "AD").astype(int)
    fit, test = split == "train", split == "test"
    mean, std = X[fit].mean(0), X[fit].std(0)
    # the old rule: unweighted fit at the tied-best (strongest) C, cut at 1/2 -> every test scan predicted CN
    old = LogisticRegression(C=1e-4, max_iter=5000).fit((X[fit] - mean) / std, y[fit])
    p_old = old.predict_proba((X[test] - mean) / std)[:, 1]
    assert (p_old < 0.5).all() and abs(p_old.mean() - y[fit].mean()) < 0.01

    res = probe_ad_vs_cn(X, dx, split, subject, seed=0)
    assert res["C"] == 1e-4  # the CV AUC still ties across C: the same choice as before ...
    yt = y[res["test_index"]]
    pred = (res["test_score"] >= res["threshold"]).astype(int)
    assert 0 < pred.sum() < len(pred)  # ... but both classes are predicted now
    assert res["recall"] > 0.5 and res["f1"] > 0.4 and res["mcc"] > 0.3 and res["balanced_accuracy"] > 0.65
    # the metrics are scikit-learn's on the reported threshold
    assert res["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(yt, pred))
    assert res["recall"] == pytest.approx(recall_score(yt, pred))
    assert res["f1"] == pytest.approx(f1_score(yt, pred))
    assert res["mcc"] == pytest.approx(matthews_corrcoef(yt, pred))
    # the threshold: best Youden's J of the out-of-fold scores (reproduced independently, scikit-learn's ROC)
    Xf, yf, gf = X[fit], y[fit], subject[fit]
    oof = np.empty(len(yf))
    for tr, va in StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=0).split(Xf, yf, gf):
        m, sd = Xf[tr].mean(0), Xf[tr].std(0)
        clf = LogisticRegression(C=1e-4, max_iter=5000, random_state=0, class_weight="balanced")
        clf.fit((Xf[tr] - m) / sd, yf[tr])
        oof[va] = clf.predict_proba((Xf[va] - m) / sd)[:, 1]
    fpr, tpr, _ = roc_curve(yf, oof)
    best_j = float(np.max(tpr - fpr))
    assert 2 * res["threshold_cv_balanced_accuracy"] - 1 == pytest.approx(best_j, abs=1e-9)
    oof_pred = oof >= res["threshold"]
    assert balanced_accuracy_score(yf, oof_pred) == pytest.approx(res["threshold_cv_balanced_accuracy"], abs=1e-9)
    # the class-balanced fit is centred: its mean training P(AD) is near 1/2, not the prior 1/4
    assert abs(float(np.mean(res["test_score"])) - 0.5) < 0.05


def test_balanced_threshold_by_hand() -> None:
    from ldae.evaluation.probes import balanced_threshold

    y = np.array([0, 0, 0, 1, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.7])
    t, b = balanced_threshold(y, s)
    # cut between 0.3 and 0.35: TPR 1, TNR 3/4 -> 0.875; between 0.4 and 0.6: TPR 2/3, TNR 1 -> 0.833
    assert t == pytest.approx(0.325) and b == pytest.approx(0.875)
    # a perfectly separable tie set: the candidate nearest 1/2 wins
    t2, b2 = balanced_threshold(np.array([0, 1]), np.array([0.2, 0.9]))
    assert t2 == pytest.approx(0.55) and b2 == 1.0
    assert balanced_threshold(np.array([1, 1]), np.array([0.2, 0.3]))[0] == 0.5
    # scores ranked the wrong way round: no cut beats chance, the neutral 1/2 is kept
    assert balanced_threshold(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.6, 0.7])) == (0.5, 0.5)


def _nested_cv_r2_reference(X, y, split, subject, seed: int = 0) -> float:
    """Nested subject-grouped CV R² over the train rows by scikit-learn's own machinery: for each outer fold,
    GridSearchCV over (StandardScaler -> Ridge) with the inner folds on the outer-train rows, refit, predict
    the outer-validation rows; pooled out-of-fold predictions scored by r2_score. The fold assignment is
    the module's (a seeded relabelling fed to GroupKFold); the grid is reversed because GridSearchCV breaks
    ties toward the first value and the probe toward the strongest regularisation."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from ldae.evaluation.probes import DEFAULT_ALPHAS, _grouped_folds

    fit = split == "train"
    Xf, yf, gf = X[fit], y[fit], subject[fit]
    oof = np.empty(len(yf))
    for tr, va in _grouped_folds(gf, 5, seed):
        inner = _grouped_folds(gf[tr], 5, seed + 1)
        search = GridSearchCV(make_pipeline(StandardScaler(), Ridge()),
                              {"ridge__alpha": list(reversed(DEFAULT_ALPHAS))},
                              scoring="neg_mean_absolute_error", cv=inner)
        oof[va] = search.fit(Xf[tr], yf[tr]).predict(Xf[va])
    return float(r2_score(yf, oof))


def test_regression_probe_nested_cv_r2_matches_a_scikit_learn_grid_search() -> None:
    from ldae.evaluation.probes import probe_regression

    X, dx, split, age, subject, w = _cohort(signal=1.0)
    rng = np.random.default_rng(3)
    for target in (X @ w * 10.0 + 3.0,                                        # linear: R² near 1
                   X @ w + rng.normal(scale=1.0, size=len(X)),                # partly linear
                   rng.normal(size=len(X))):                                  # noise: R² <= 0
        r = probe_regression(X, target, split, subject, seed=0, target="volume")
        assert r["cv_r2"] == pytest.approx(_nested_cv_r2_reference(X, target, split, subject, seed=0), abs=1e-9)
    assert probe_regression(X, X @ w * 10.0, split, subject)["cv_r2"] > 0.99
    assert probe_regression(X, rng.normal(size=len(X)), split, subject)["cv_r2"] < 0.05


def test_nested_cv_r2_says_no_to_a_subject_identity_shortcut() -> None:
    """A target that is a per-subject random effect, with embeddings that identify the subject (its sessions
    share a random code) but carry nothing that generalises: any ungrouped CV would score it near 1 by
    matching a subject's other session; the subject-grouped nested CV must score it at or below 0."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import KFold, cross_val_predict

    from ldae.evaluation.probes import probe_regression

    rng = np.random.default_rng(0)
    n_subjects, sessions, d = 80, 3, 64
    subject = np.repeat(np.arange(n_subjects), sessions)
    code = rng.normal(size=(n_subjects, d))
    X = code[subject] + 0.05 * rng.normal(size=(len(subject), d))
    y = rng.normal(size=n_subjects)[subject]
    split = np.where(subject % 5 == 0, "test", "train")
    r = probe_regression(X, y, split, subject, seed=0)
    assert r["cv_r2"] is not None and r["cv_r2"] < 0.05
    fit = split == "train"
    leaky = cross_val_predict(Ridge(alpha=1.0), X[fit], y[fit], cv=KFold(5, shuffle=True, random_state=0))
    assert 1 - np.sum((leaky - y[fit]) ** 2) / np.sum((y[fit] - y[fit].mean()) ** 2) > 0.5  # the shortcut is real


def _latent_cohort(n_subjects: int = 200, sessions: int = 2, rank: int = 4, p: int = 100, noise: float = 2.0,
                   seed: int = 0):
    """Latents ``Z = F B + noise`` with ``F`` a per-subject low-rank factor (sessions jitter it a little);
    returns ``(F, Z, split, subject, best)``, ``best(rows)`` = the R² the true map ``F B`` reaches on those
    rows (1 − noise SS / total SS around their mean: what a perfect read-out of F would score there)."""
    rng = np.random.default_rng(seed)
    subject = np.repeat(np.arange(n_subjects), sessions)
    F = rng.normal(size=(n_subjects, rank))[subject] + 0.1 * rng.normal(size=(len(subject), rank))
    clean = F @ rng.normal(size=(rank, p))
    Z = clean + noise * rng.normal(size=(len(subject), p))
    split = np.where(subject % 4 == 0, "test", "train")

    def best(rows: np.ndarray) -> float:
        return float(1 - np.sum((Z[rows] - clean[rows]) ** 2) / np.sum((Z[rows] - Z[rows].mean(0)) ** 2))

    return F, Z, split, subject, best


def test_latent_readout_recovers_the_explained_share_and_matches_a_closed_form_ridge() -> None:
    """A code that holds the latents' factors reproduces the share of their variation that the generator
    puts there; the test R² equals a numpy closed-form ridge (standardised features, intercept) at the
    chosen alpha; noise features explain nothing."""
    from ldae.evaluation.probes import probe_latent_readout

    F, Z, split, subject, best = _latent_cohort()
    r = probe_latent_readout(F, Z, split, subject, seed=0)
    assert 0.4 < best(split == "test") < 0.6
    assert r["r2"] == pytest.approx(best(split == "test"), abs=0.02)
    assert r["cv_r2"] == pytest.approx(best(split == "train"), abs=0.02)
    assert r["n_test_subjects"] == 50 and r["n_train_subjects"] == 150

    fit, test = split == "train", split == "test"
    mean, std = F[fit].mean(0), F[fit].std(0)
    Xs = (F[fit] - mean) / std
    W = np.linalg.solve(Xs.T @ Xs + r["alpha"] * np.eye(F.shape[1]), Xs.T @ (Z[fit] - Z[fit].mean(0)))
    pred = (F[test] - mean) / std @ W + Z[fit].mean(0)
    ref = 1 - np.sum((pred - Z[test]) ** 2) / np.sum((Z[test] - Z[test].mean(0)) ** 2)
    assert r["r2"] == pytest.approx(ref, abs=1e-9)

    noise = np.random.default_rng(1).normal(size=(len(Z), 8))
    r = probe_latent_readout(noise, Z, split, subject, seed=0)
    assert r["r2"] < 0.05 and r["cv_r2"] < 0.05


def test_latent_readout_says_no_to_an_encoder_that_memorised_its_training_scans() -> None:
    """Codes that carry the factors for the training scans only (as an encoder that memorised them would)
    score high in train-split CV and at or below zero on the test split: the gap is the diagnostic."""
    from ldae.evaluation.probes import probe_latent_readout

    F, Z, split, subject, best = _latent_cohort()
    X = F.copy()
    X[split == "test"] = np.random.default_rng(2).normal(size=((split == "test").sum(), F.shape[1]))
    r = probe_latent_readout(X, Z, split, subject, seed=0)
    assert r["cv_r2"] == pytest.approx(best(split == "train"), abs=0.02)
    assert r["r2"] < 0.0


def test_latent_readout_errors_name_the_problem() -> None:
    from ldae.evaluation.probes import probe_latent_readout

    F, Z, split, subject, _ = _latent_cohort()
    with pytest.raises(LDAEError, match=r"latent read-out \(y_sem\): 400 embedding rows but 399 latents"):
        probe_latent_readout(F, Z[:-1], split, subject, what="latent read-out (y_sem)")
    bad = Z.copy()
    bad[0, 0] = np.nan
    with pytest.raises(LDAEError, match="the latents hold 1 NaN/inf"):
        probe_latent_readout(F, bad, split, subject)
