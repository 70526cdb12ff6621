"""Missing-timepoint bookkeeping: exact triplets on a hand-made cohort, slerp/lerp properties, nearest visit,
stratified summaries, paired method comparisons with subject-bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ldae.diffusion.interpolation import lerp, slerp
from ldae.errors import CohortError, LDAEError
from ldae.evaluation.longitudinal import (
    enumerate_triplets,
    nearest_visit_baseline,
    summarize_triplet_scores,
)


def _cohort() -> pd.DataFrame:
    # shuffled rows and a non-default index: the triplets must follow months, and report index labels
    rows = [
        ("B", 12), ("A", 0), ("C", 0), ("A", 24), ("B", 0), ("A", 6), ("B", 36),
        ("C", 12), ("B", 6), ("A", 12),
    ]  # fmt: skip
    df = pd.DataFrame(rows, columns=["subject", "session"])
    df.index = [100 + i for i in range(len(df))]
    return df


def test_triplets_exact() -> None:
    df = _cohort()
    tri = enumerate_triplets(df)
    idx = {(s, m): i for i, s, m in zip(df.index, df["subject"], df["session"])}
    expected = []
    for subject, months in (("A", [0, 6, 12, 24]), ("B", [0, 6, 12, 36])):  # C has only 2 sessions
        for a, b, c in [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]:
            m0, m1, m2 = months[a], months[b], months[c]
            expected.append(
                (subject, m0, m1, m2, idx[subject, m0], idx[subject, m1], idx[subject, m2],
                 (m1 - m0) / (m2 - m0), m2 - m0, min(m1 - m0, m2 - m1))
            )  # fmt: skip
    got = list(
        tri[
            [
                "subject",
                "start_month",
                "target_month",
                "end_month",
                "start_index",
                "target_index",
                "end_index",
            ]
            + ["t", "time_gap_months", "prediction_gap_months"]
        ].itertuples(index=False, name=None)
    )
    assert got == expected
    # A: (0,6,12) t=.5 middle; (0,6,24) t=.25 early; (0,12,24) t=.5; (6,12,24) t=1/3 -> early (boundary)
    assert tri["relative_position"].tolist()[:4] == ["middle", "early", "middle", "early"]
    # B: (0,6,12) middle, (0,6,36) early, (0,12,36) early (1/3), (6,12,36) t=0.2 early
    assert tri["relative_position"].tolist()[4:] == ["middle", "early", "early", "early"]
    assert enumerate_triplets(df[df["subject"] == "C"]).empty


def test_triplets_errors() -> None:
    with pytest.raises(CohortError, match="session"):
        enumerate_triplets(pd.DataFrame({"subject": ["a"]}))
    dup = pd.DataFrame({"subject": ["a", "a", "a"], "session": [0, 6, 6]})
    with pytest.raises(CohortError, match="duplicate"):
        enumerate_triplets(dup)


def test_slerp_properties() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    b = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    b = b / b.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * a.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    b[2] = -a[2] + 1e-12  # (almost) anti-parallel row -> lerp fallback
    b[3] = a[3] * (1 + 1e-14)  # parallel row
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    out = slerp(a, b, t)
    assert torch.equal(out[0], a[0]) and torch.equal(out[4], b[4])  # exact endpoints
    torch.testing.assert_close(out[2], lerp(a[2], b[2], 0.5))
    torch.testing.assert_close(out[3], a[3], rtol=1e-12, atol=1e-12)
    # per-row loop equals the batch (different angles per row)
    for i in range(5):
        torch.testing.assert_close(out[i], slerp(a[i].flatten(), b[i].flatten(), float(t[i])).view_as(a[i]))

    # equal-norm vectors: the norm is preserved and the angle to a grows linearly with t
    x = torch.randn(64, generator=g, dtype=torch.float64)
    y = torch.randn(64, generator=g, dtype=torch.float64)
    y = y / y.norm() * x.norm()
    theta = torch.arccos(torch.dot(x, y) / x.norm() ** 2)
    for s in (0.1, 0.3, 0.6, 0.9):
        z = slerp(x, y, s)
        assert float(z.norm()) == pytest.approx(float(x.norm()), rel=1e-12)
        ang = torch.arccos(torch.clamp(torch.dot(x, z) / (x.norm() * z.norm()), -1, 1))
        assert float(ang) == pytest.approx(s * float(theta), rel=1e-9)
        # independent closed form: rotate x in the (x, y) plane
        u = x / x.norm()
        v = y - torch.dot(y, u) * u
        v = v / v.norm()
        ref = x.norm() * (torch.cos(s * theta) * u + torch.sin(s * theta) * v)
        torch.testing.assert_close(z, ref, rtol=1e-10, atol=1e-10)

    # numpy in, numpy out; scalar t broadcast over the batch
    an, bn = a.numpy(), b.numpy()
    out_np = slerp(an, bn, 0.5)
    assert isinstance(out_np, np.ndarray)
    np.testing.assert_allclose(out_np, slerp(a, b, torch.full((5,), 0.5, dtype=torch.float64)).numpy())
    with pytest.raises(LDAEError, match="t has shape"):
        slerp(a, b, torch.zeros(3))


def test_lerp_and_nearest_visit() -> None:
    a = np.zeros((3, 2))
    b = np.ones((3, 2))
    np.testing.assert_allclose(lerp(a, b, np.array([0.0, 0.25, 1.0])), [[0, 0], [0.25, 0.25], [1, 1]])
    assert nearest_visit_baseline("start", "end", 0.4) == "start"
    assert nearest_visit_baseline("start", "end", 0.5) == "start"  # tie -> earlier
    assert nearest_visit_baseline("start", "end", 0.6) == "end"
    out = nearest_visit_baseline(a, b, np.array([0.5, 0.51, 0.2]))
    np.testing.assert_array_equal(out, [[0, 0], [1, 1], [0, 0]])
    tout = nearest_visit_baseline(torch.zeros(3, 2), torch.ones(3, 2), [0.9, 0.1, 0.5])
    assert isinstance(tout, torch.Tensor) and tout[:, 0].tolist() == [1.0, 0.0, 0.0]


def test_summary_stratified() -> None:
    tri = enumerate_triplets(_cohort())
    frames = []
    for method, offset in (("ldae", 0.9), ("nearest_visit", 0.8)):
        f = tri.copy()
        f["method"] = method
        f["ssim"] = offset - 0.001 * f["time_gap_months"]
        f["mse"] = 0.01 * f["prediction_gap_months"]
        frames.append(f)
    scores = pd.concat(frames, ignore_index=True)
    summary = summarize_triplet_scores(scores)
    assert list(summary) == ["ldae", "nearest_visit"]
    s = summary["ldae"]
    assert s["n_triplets"] == 8
    assert s["ssim"] == pytest.approx(0.9 - 0.001 * tri["time_gap_months"].mean())
    assert s["mse"] == pytest.approx(0.01 * tri["prediction_gap_months"].mean())
    # time gaps: A 12,24,24,18 ; B 12,36,36,30 -> bins 0-12 (2), 12-24 (3), 24-36 (3)
    assert {k: v["n"] for k, v in s["by_time_gap"].items()} == {"0-12": 2, "12-24": 3, "24-36": 3}
    assert s["by_time_gap"]["24-36"]["ssim"] == pytest.approx(0.9 - 0.001 * (36 + 36 + 30) / 3)
    # prediction gaps: A 6,6,12,6 ; B 6,6,12,6 -> 0-6 (6), 6-12 (2)
    assert {k: v["n"] for k, v in s["by_prediction_gap"].items()} == {"0-6": 6, "6-12": 2}
    assert {k: v["n"] for k, v in s["by_relative_position"].items()} == {"early": 5, "middle": 3}
    assert summary["nearest_visit"]["ssim"] == pytest.approx(s["ssim"] - 0.1)
    with pytest.raises(LDAEError, match="lacks"):
        summarize_triplet_scores(scores.drop(columns=["time_gap_months"]))


def test_triplet_and_training_plots_write_png(tmp_path) -> None:
    from ldae.evaluation.plots import plot_training_curves, plot_triplet_scores

    tri = enumerate_triplets(_cohort())
    tri["ssim"] = 0.9 - 0.001 * tri["time_gap_months"]
    tri["mse"] = 0.01
    summary = summarize_triplet_scores(tri.assign(method="ldae"))
    summary |= summarize_triplet_scores(tri.assign(method="latent_lerp", ssim=tri["ssim"] - 0.05))
    png = plot_triplet_scores(tmp_path / "triplets.png", summary, metric="ssim")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000

    # a Lightning-style log: train and val metrics on separate rows (NaN elsewhere), a text column
    log = pd.DataFrame(
        {
            "epoch": [0, 0, 1, 1],
            "step": [9, 9, 19, 19],
            "train/loss": [1.0, np.nan, 0.5, np.nan],
            "val/ssim": [np.nan, 0.5, np.nan, 0.7],
            "note": ["a", "b", "c", "d"],
            "empty": [np.nan] * 4,
        }
    )
    log.to_csv(tmp_path / "metrics.csv", index=False)
    png = plot_training_curves(tmp_path / "curves.png", tmp_path / "metrics.csv")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    pd.DataFrame({"step": [1], "note": ["x"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(LDAEError, match="no numeric metric"):
        plot_training_curves(tmp_path / "x.png", tmp_path / "bad.csv")


def test_subject_bootstrap_mean_ci_matches_a_plain_loop() -> None:
    from ldae.evaluation.longitudinal import subject_bootstrap_mean_ci

    rng = np.random.default_rng(3)
    subject = np.array(["a", "a", "b", "c", "c", "c", "d"])
    values = rng.normal(size=len(subject))
    got = subject_bootstrap_mean_ci(values, subject, seed=7, replicates=500)
    # reference: the same draws, one replicate at a time, the drawn subjects' rows concatenated
    uniq = np.unique(subject)
    draws = np.random.default_rng(7).integers(0, len(uniq), size=(500, len(uniq)))
    means = [np.concatenate([values[subject == uniq[j]] for j in d]).mean() for d in draws]
    np.testing.assert_allclose(got, np.percentile(means, [2.5, 97.5]), rtol=1e-12)
    assert subject_bootstrap_mean_ci(values, ["x"] * len(values)) is None
    assert subject_bootstrap_mean_ci(np.full(6, 0.25), list("aabbcc")) == [0.25, 0.25]


def test_compare_methods_names_the_winner_per_pair_and_time_gap() -> None:
    from ldae.evaluation.longitudinal import compare_methods, enumerate_triplets

    rows = [(s, m) for s in ("A", "B", "C", "D") for m in (0, 6, 12, 36)]
    tri = enumerate_triplets(pd.DataFrame(rows, columns=["subject", "session"]))
    rng = np.random.default_rng(0)
    frames = []
    for method, ssim in (("ldae", 0.90), ("copy", 0.95), ("noise", 0.90)):
        f = tri.copy()
        f["method"] = method
        f["ssim"] = ssim + (rng.normal(scale=0.05, size=len(f)) if method == "noise" else 0.001 * rng.normal(size=len(f)))
        f["mse"] = 1 - f["ssim"]
        frames.append(f)
    out = compare_methods(pd.concat(frames, ignore_index=True), ["ldae", "copy", "noise"], {"ssim": True, "mse": False})
    pairs = {(p["method"], p["versus"], p["metric"]): p for p in out}
    assert len(out) == 6
    p = pairs["ldae", "copy", "ssim"]
    assert p["winner"] == "copy" and p["mean_difference"] == pytest.approx(-0.05, abs=2e-3)
    assert p["ci95"][0] < p["mean_difference"] < p["ci95"][1] < 0 and p["n_subjects"] == 4 and p["n_triplets"] == 16
    assert pairs["ldae", "copy", "mse"]["winner"] == "copy"  # lower MSE is better: same verdict
    # time gaps of the triplets: 12, 36 (x3) per subject -> bins 0-12 and 24-36
    assert {k: v["n_triplets"] for k, v in p["by_time_gap"].items()} == {"0-12": 4, "24-36": 12}
    assert all(v["winner"] == "copy" for v in p["by_time_gap"].values())
