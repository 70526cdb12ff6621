"""``ldae demo`` end to end at a miniature scale (cohort of 16 subjects, one epoch per stage, quick
evaluation): metrics.json with the evaluation's keys + per-stage timings + the aims, and report.html."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldae.cli import main

MINI = ["--autoencoder.trainer.max_epochs", "1", "--autoencoder.loss.adversarial_warmup_epochs", "1",
        "--diffusion.trainer.max_epochs", "1", "--diffusion.validation.sample_every_n_epochs", "0",
        "--representation.trainer.max_epochs", "1", "--representation.trainer.check_val_every_n_epoch", "1",
        "--representation.validation.ddim_steps", "2",
        "--evaluation.reconstruction.steps", "[2]", "--evaluation.interpolation.steps", "2",
        "--evaluation.interpolation.max_triplets", "2", "--evaluation.manipulation.steps", "2",
        "--evaluation.manipulation.max_scans", "1", "--evaluation.manipulation.alphas", "[0.0, 2.0]",
        "--evaluation.manipulation.volumetry.transform", "Affine"]


@pytest.mark.slow
def test_demo_end_to_end_miniature(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("ants")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--subjects", "16", *MINI]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    stages = metrics["timings_s"]["stages"]
    assert set(stages) == {"synth", "autoencoder", "compress", "diffusion", "representation", "evaluation"}
    assert all(v > 0 for v in stages.values()) and metrics["timings_s"]["total"] >= sum(stages.values()) - 1e-6
    assert set(metrics["timings_s"]["evaluation_sections"]) >= {"probes", "reconstruction", "interpolation"}
    for key in ("probe", "reconstruction", "interpolation", "manipulation", "cohort"):
        assert key in metrics, key
    gt_auc = metrics["cohort"]["ground_truth_auc"]  # null when the cohort is too small to cross-validate
    assert metrics["cohort"]["subjects"] == 16 and (gt_auc is None or 0.0 <= gt_auc <= 1.0)
    aims = metrics["aims"]
    assert all(isinstance(a["met"], bool) for a in aims) and all(isinstance(a["value"], float) for a in aims[:2])
    learned = metrics["probe"]["learned"]["ad_vs_cn"]["auc"]
    assert aims[1]["value"] == pytest.approx(learned - metrics["probe"]["untrained"]["ad_vs_cn"]["auc"])
    # beside the AUC and SSIM aims: LDAE vs each interpolation baseline, and one signed check per arm and structure
    interp = [a for a in aims if a["aim"].startswith("LDAE interpolation")]
    assert len(interp) == 3 and all(a["met"] == (a["interval"] is not None and a["interval"][0] > 0) for a in interp)
    checks = metrics["manipulation"]["checks"]
    man = [a for a in aims if a["aim"].startswith("manipulation")]
    assert len(man) == sum(len(checks.get(arm) or {}) for arm in ("cn_to_ad", "ad_to_cn")) > 0
    # and what stage 3 must learn (factor R², AUC over both controls, semantic-only own vs other, LDAE vs LDDIM)
    from ldae.config import configs_root, load_settings
    from ldae.jobs.demo import representation_aims

    rep = representation_aims(metrics, load_settings(configs_root() / "demo.yaml")["aims"])
    assert [a["aim"] for a in aims[2:2 + len(rep)]] == [a["aim"] for a in rep]
    assert any(a["aim"].startswith("y_sem brain_volume_ml R²") for a in rep)
    assert len(aims) == 3 + len(rep) + len(interp) + len(man)
    assert printed.count("met]") == len(aims) and "report:" in printed
    html = (out / "report.html").read_text()
    assert "Aims of the demo" in html and "stages: representation" in html and html.count("data:image/png;base64,") >= 6
    assert "Direction checks" in html and "Which beats which" in html

    # a rerun resumes: every stage is already done, only the report is rewritten
    assert main(["demo", "--out", str(out), "--subjects", "16", *MINI]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["timings_s"]["stages"]["autoencoder"] == stages["autoencoder"]
    assert again["timings_s"]["total"] < metrics["timings_s"]["total"]


def test_auc_aims_need_both_the_test_split_and_the_cross_validation() -> None:
    from ldae.jobs.demo import check_aims

    aims = {"auc_gap_to_oracle_max": 0.05, "auc_gain_over_untrained_min": 0.1, "ldae_vs_ae_ssim_gap_max": 0.01}

    def metrics(test: dict, cv: dict | None) -> dict:
        return {"probe": {k: {"ad_vs_cn": {"auc": v, **({"cv_auc_best": cv[k]} if cv else {})}}
                          for k, v in test.items()}}

    test = {"learned": 0.80, "untrained": 0.60, "oracle": 0.83}
    lucky = check_aims(metrics(test, {"learned": 0.50, "untrained": 0.55, "oracle": 0.92}), aims)
    assert [a["met"] for a in lucky] == [False, False]  # the test split alone would say met twice
    assert lucky[0]["value"] == pytest.approx(0.03) and lucky[0]["value_cv"] == pytest.approx(0.42)
    assert lucky[1]["value"] == pytest.approx(0.20) and lucky[1]["value_cv"] == pytest.approx(-0.05)
    solid = check_aims(metrics(test, {"learned": 0.88, "untrained": 0.70, "oracle": 0.90}), aims)
    assert [a["met"] for a in solid] == [True, True]
    assert [a["met"] for a in check_aims(metrics(test, None), aims)] == [True, True]  # no CV: test split only


def test_demo_aims_list_the_signed_checks_and_the_interpolation_baselines() -> None:
    from ldae.jobs.demo import check_aims

    def check(passed: bool, frac: float) -> dict:
        return {"passed": passed, "fraction_of_gap_at_max_alpha": frac, "expected": "up", "reason": ""}

    def pair(versus: str, lo: float, hi: float) -> dict:
        return {"method": "ldae", "versus": versus, "metric": "ssim", "mean_difference": (lo + hi) / 2,
                "ci95": [lo, hi], "winner": "ldae" if lo > 0 else (versus if hi < 0 else None)}

    metrics = {"manipulation": {"alphas": [0.0, 1.5, 3.0], "checks": {
        "min_gap_fraction": 0.25, "cn_to_ad": {"ventricle": check(False, -0.4), "hippocampus": check(True, 0.3)},
        "ad_to_cn": {"ventricle": check(True, 0.5), "hippocampus": check(False, 0.1)}, "passed": False}},
        "interpolation_comparison": {"pairs": [pair("nearest_visit", -0.02, -0.01), pair("latent_lerp", 0.01, 0.03),
                                               pair("ldae_nearest_visit", -0.01, 0.02)]}}
    aims = {"auc_gap_to_oracle_max": 0.05, "auc_gain_over_untrained_min": 0.1, "ldae_vs_ae_ssim_gap_max": 0.01,
            "interpolation_must_beat": ["nearest_visit", "ldae_nearest_visit", "latent_lerp"]}
    out = check_aims(metrics, aims)
    by_name = {a["aim"]: a for a in out}
    assert len(out) == 7
    interp = [a for a in out if "interpolation" in a["aim"]]
    assert [a["met"] for a in interp] == [False, False, True]  # nearest visit wins; no clear difference; LDAE wins
    assert interp[0]["value"] == pytest.approx(-0.015) and interp[0]["interval"] == [-0.02, -0.01]
    man = [a for a in out if "manipulation" in a["aim"]]
    assert [a["met"] for a in man] == [False, True, True, False]
    assert man[0]["value"] == pytest.approx(-0.4) and "ventricles up" in man[0]["aim"]
    assert all(isinstance(a["met"], bool) for a in by_name.values())


def test_representation_aims_compare_y_sem_with_the_linear_baselines() -> None:
    from ldae.jobs.demo import check_aims, representation_aims

    def fit(r2: float, cv: float | None = None) -> dict:
        return {"r2": r2, "cv_r2": cv, "mae": 1.0}

    def auc(test: float, cv: float) -> dict:
        return {"ad_vs_cn": {"auc": test, "cv_auc_best": cv}}

    def ssim(**by_steps: float) -> dict:
        return {k.lstrip("s"): {"ssim": v} for k, v in by_steps.items()}

    metrics = {
        "factors": {"learned": {"brain_volume_ml": fit(0.96), "ventricle_volume_ml": fit(0.80)},
                    "latent_pca": {"brain_volume_ml": fit(0.99), "ventricle_volume_ml": fit(0.84),
                                   "hippocampus_volume_ml": fit(0.2)},
                    "skipped": {}},
        # test: the untrained encoder is the stronger control, CV: latent PCA is
        "probe": {"learned": auc(0.80, 0.75), "untrained": auc(0.74, 0.60), "latent_pca": auc(0.70, 0.71)},
        "reconstruction": {"ldae_semantic": ssim(s10=0.60, s50=0.64), "ldae_semantic_other": ssim(s10=0.50, s50=0.60),
                           "ldae_encoded": ssim(s10=0.85, s20=0.87), "lddim_encoded": ssim(s10=0.84, s20=0.87)},
    }
    aims = {"factor_r2": {"brain_volume_ml": {"min": 0.95}, "ventricle_volume_ml": {"vs_latent_pca": -0.05},
                          "hippocampus_volume_ml": {"vs_latent_pca": 0.0}},
            "auc_gain_over_controls_min": 0.05, "semantic_own_vs_other_min": 0.05, "ldae_beats_lddim_at_steps": [10, 20]}
    out = representation_aims(metrics, aims)
    # no learned hippocampus fit: that aim is left out, not judged on a missing value
    assert [(a["value"], a["met"]) for a in out[:2]] == [(pytest.approx(0.96), True), (pytest.approx(-0.04), True)]
    assert "latent PCA's (0.840)" in out[1]["aim"]
    gain = out[2]  # each estimate against its own stronger control: 0.80 - 0.74 on test, 0.75 - 0.71 in CV
    assert gain["value"] == pytest.approx(0.06) and gain["value_cv"] == pytest.approx(0.04) and not gain["met"]
    sem = out[3]  # the largest step count measured with both y_sem: 50 (0.64 - 0.60), not 10 (0.10)
    assert "(50 steps, guidance scale 1)" in sem["aim"] and sem["value"] == pytest.approx(0.04) and not sem["met"]
    assert "at most" not in sem["aim"]  # no autoencoder_other row: no bound stated
    assert [(a["value"], a["met"]) for a in out[4:]] == [(pytest.approx(0.01), True), (pytest.approx(0.0), False)]
    assert len(out) == 6

    bounded = {**metrics, "guidance_scale": 3.0, "reconstruction": {
        **metrics["reconstruction"], "autoencoder": {"ssim": 0.90}, "autoencoder_other": {"ssim": 0.78}}}
    sem = representation_aims(bounded, aims)[3]
    assert "guidance scale 3)" in sem["aim"] and "at most 0.120 (autoencoder of the scan minus" in sem["aim"]

    metrics["factors"]["learned"]["ventricle_volume_ml"] = fit(0.78)  # 0.06 below latent PCA: not met
    # both estimates judged when both were measured: met on the test split, not in CV (0.52 vs 0.60)
    metrics["factors"]["learned"]["brain_volume_ml"] = fit(0.96, cv=0.97)
    metrics["factors"]["latent_pca"]["hippocampus_volume_ml"] = fit(0.2, cv=0.60)
    metrics["factors"]["learned"]["hippocampus_volume_ml"] = fit(0.25, cv=0.52)
    hip = [a for a in representation_aims(metrics, aims) if "hippocampus" in a["aim"]]
    assert len(hip) == 1 and hip[0]["value"] == pytest.approx(0.05) and hip[0]["value_cv"] == pytest.approx(-0.08)
    assert not hip[0]["met"]
    brain = representation_aims(metrics, aims)[0]
    assert brain["value_cv"] == pytest.approx(0.97) and brain["met"]
    del metrics["factors"]["learned"]["hippocampus_volume_ml"]
    metrics["factors"]["learned"]["brain_volume_ml"] = fit(0.96)
    metrics["probe"]["learned"] = auc(0.80, 0.77)  # +0.06 and +0.06 over the stronger controls: met
    again = representation_aims(metrics, aims)
    assert [a["met"] for a in again[:3]] == [True, False, True]
    # check_aims places them after the AUC aims it always had; a run without these sections adds none
    assert representation_aims({}, aims) == []
    full = check_aims(metrics, {**aims, "auc_gain_over_untrained_min": 0.1})
    assert [a["aim"] for a in full[1:]] == [a["aim"] for a in again] and "untrained encoder" in full[0]["aim"]
