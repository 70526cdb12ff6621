"""The evaluation's typed results and its sections on stub models (fast, no trained run): metrics.json
content of the dataclasses, the signed/sized manipulation checks on fabricated volumes and through the
section, the interpolation baselines and their paired comparison."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch


# ----------------------------------------------------------------------------------------------- probes
def _probe_inputs(seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    n_sub = 24
    subject = np.repeat([f"s{i:02d}" for i in range(n_sub)], 2)
    dx = np.repeat(np.where(np.arange(n_sub) % 2 == 0, "CN", "AD"), 2)
    dx[:2] = "MCI"
    split = np.repeat(np.where(np.arange(n_sub) < 16, "train", "test"), 2)
    age = rng.uniform(60, 85, size=len(subject))
    X = rng.normal(size=(len(subject), 5))
    X[:, 0] += (dx == "AD") * 1.5
    X[:, 1] += (age - 70) / 5
    df = pd.DataFrame({"subject": subject, "diagnosis": dx, "split": split, "age": age})
    return X, df


def test_feature_probes_json_is_the_probe_functions_scalar_metrics(tmp_path: Path) -> None:
    from ldae.evaluation.probes import load_probes, probe_ad_vs_cn, probe_age, save_probes, scalar_metrics
    from ldae.evaluation.sections.probing import probe_section

    X, df = _probe_inputs()
    section = probe_section({"learned": X}, df, seed=0)
    cols = (df["split"].to_numpy(), df["subject"].to_numpy())
    ad = probe_ad_vs_cn(X, df["diagnosis"].to_numpy(), *cols, seed=0)
    age = probe_age(X, df["age"].to_numpy(), *cols, seed=0)
    got = section.to_json()["learned"]
    # same keys in the same order as the dict sections wrote (json.dumps keeps the order)
    assert json.dumps(got["ad_vs_cn"]) == json.dumps(scalar_metrics(ad))
    assert json.dumps(got["age"]) == json.dumps(scalar_metrics(age))
    assert "_fit" not in json.dumps(section.to_json())
    fitted = section["learned"]
    np.testing.assert_array_equal(fitted.ad_model.coef, ad["coef"])
    np.testing.assert_array_equal(fitted.ad_model.direction, ad["direction"])
    np.testing.assert_array_equal(fitted.age_model.test_output, age["test_prediction"])
    assert fitted.age_model.direction is None
    # probes.json from the typed result equals the one written from the raw dicts
    fitted.save(tmp_path / "typed.json")
    save_probes(tmp_path / "raw.json", ad, age)
    assert (tmp_path / "typed.json").read_text() == (tmp_path / "raw.json").read_text()
    assert load_probes(tmp_path / "typed.json")["ad_vs_cn"]["C"] == ad["C"]


def test_reconstruction_json_nests_step_counts_in_first_seen_order() -> None:
    from ldae.evaluation.results import ReconstructionRow, ReconstructionScores, ReconstructionSection

    def s(v: float) -> ReconstructionScores:
        return ReconstructionScores(ssim=v, mse=1 - v, psnr=10 * v, lpips=None, seconds_per_scan=0.5)

    rows = [ReconstructionRow("autoencoder", None, s(0.9)), ReconstructionRow("ldae_encoded", 10, s(0.8)),
            ReconstructionRow("ldae_semantic", 10, s(0.5)), ReconstructionRow("ldae_encoded", 20, s(0.85))]
    out = ReconstructionSection(rows, pd.DataFrame(), "unavailable").to_json()
    assert list(out) == ["autoencoder", "ldae_encoded", "ldae_semantic"]
    assert list(out["ldae_encoded"]) == ["10", "20"] and out["ldae_encoded"]["20"]["ssim"] == 0.85
    assert out["autoencoder"] == {"ssim": 0.9, "mse": pytest.approx(0.1), "psnr": 9.0, "lpips": None,
                                  "seconds_per_scan": 0.5}


# ------------------------------------------------------------------------------ manipulation checks
ALPHAS = [0.0, 1.5, 3.0]


def _volumes(vent_slope: float, hip_slope: float, n: int = 3, wobble: float = 0.0) -> pd.DataFrame:
    """Fabricated measured volumes: ventricles 30 ml, hippocampi 7 ml at α = 0, changing by ``slope`` % per
    unit α (``wobble`` % added at the middle α)."""
    rows = []
    for r in range(n):
        for a in ALPHAS:
            extra = wobble if a == ALPHAS[1] else 0.0
            rows.append({"row": r, "alpha": a, "ventricle": (30 + r) * (1 + (vent_slope * a + extra) / 100),
                         "hippocampus": (7 + 0.1 * r) * (1 + hip_slope * a / 100)})
    return pd.DataFrame(rows)


# cohort gap: AD ventricles 40 % larger, hippocampi 15 % smaller than CN
GAP_CN_TO_AD = {"ventricle": 40.0, "hippocampus": -15.0}


def test_check_passes_a_manipulation_that_moves_the_disease_way_by_enough() -> None:
    from ldae.evaluation.sections.manipulation import check_arm

    checks = check_arm(_volumes(5.0, -2.0), ALPHAS, "cn_to_ad", GAP_CN_TO_AD, min_gap_fraction=0.25)
    v, h = checks["ventricle"], checks["hippocampus"]
    assert v.passed and h.passed and v.reason == "" and v.expected == "up" and h.expected == "down"
    # 5 %/α on a 40 % gap: 0.125 of the gap per unit α, 15 % = 0.375 of it at α = 3
    assert v.fraction_of_gap_per_alpha == pytest.approx(5.0 / 40.0)
    assert v.fraction_of_gap_at_max_alpha == pytest.approx(15.0 / 40.0)
    assert h.fraction_of_gap_at_max_alpha == pytest.approx(6.0 / 15.0)
    assert v.change_pct == pytest.approx([0.0, 7.5, 15.0]) and v.scans_in_expected_direction == 1.0


def test_check_fails_when_ventricles_shrink_on_the_way_to_ad() -> None:
    """The issue's fake run: monotonic, sizeable, but the wrong sign."""
    from ldae.evaluation.sections.manipulation import _monotonic, check_arm

    table = _volumes(-5.0, -2.0)
    checks = check_arm(table, ALPHAS, "cn_to_ad", GAP_CN_TO_AD)
    v = checks["ventricle"]
    vent = table.groupby("alpha")["ventricle"].mean().to_numpy()
    assert _monotonic(list(vent))  # what the old check looked at: it would have passed
    assert not v.passed and not v.signed and v.monotonic and "wrong way" in v.reason
    assert v.fraction_of_gap_at_max_alpha == pytest.approx(-15.0 / 40.0)
    assert v.scans_in_expected_direction == 0.0
    assert checks["hippocampus"].passed  # the other structure is judged on its own


def test_check_fails_too_small_and_turning_back_and_without_a_gap() -> None:
    from ldae.evaluation.sections.manipulation import check_arm

    small = check_arm(_volumes(1.0, -0.3), ALPHAS, "cn_to_ad", GAP_CN_TO_AD)["ventricle"]
    assert small.signed and small.monotonic and small.large_enough is False and not small.passed
    assert small.fraction_of_gap_at_max_alpha == pytest.approx(3.0 / 40.0) and "< 0.25" in small.reason
    back = check_arm(_volumes(5.0, -2.0, wobble=10.0), ALPHAS, "cn_to_ad", GAP_CN_TO_AD)["ventricle"]
    assert back.signed and not back.monotonic and not back.passed and "turns back" in back.reason
    nogap = check_arm(_volumes(5.0, -2.0), ALPHAS, "cn_to_ad", {})["ventricle"]
    assert nogap.large_enough is None and not nogap.passed and "no AD−CN gap" in nogap.reason
    # AD -> CN: ventricles must shrink, hippocampi grow (the reverse signs)
    rev = check_arm(_volumes(-5.0, 2.0), ALPHAS, "ad_to_cn", {"ventricle": -30.0, "hippocampus": 18.0})
    assert rev["ventricle"].passed and rev["hippocampus"].passed and rev["ventricle"].expected == "down"


def test_cohort_gap_from_ground_truth_columns() -> None:
    from ldae.evaluation.sections.manipulation import cohort_gap_pct

    df = pd.DataFrame({"diagnosis": ["CN", "CN", "AD", "AD", "MCI"],
                       "ventricle_volume_ml": [20.0, 30.0, 35.0, 35.0, 99.0],
                       "hippocampus_volume_ml": [8.0, 8.0, 6.0, 7.0, 0.0]})
    gaps, source = cohort_gap_pct(df)
    assert "ground-truth" in source
    assert gaps["cn_to_ad"]["ventricle"] == pytest.approx(100 * (35 - 25) / 25)
    assert gaps["cn_to_ad"]["hippocampus"] == pytest.approx(100 * (6.5 - 8) / 8)
    assert gaps["ad_to_cn"]["ventricle"] == pytest.approx(100 * (25 - 35) / 35)
    assert cohort_gap_pct(df.drop(columns=["ventricle_volume_ml"]))[0] == {}


def test_cohort_gap_without_ground_truth_uses_the_first_alpha_volumes() -> None:
    from ldae.evaluation.results import ManipulationArm
    from ldae.evaluation.sections.manipulation import cohort_gap_pct

    cn, ad = _volumes(5.0, -2.0), _volumes(-5.0, 2.0)
    ad[["ventricle", "hippocampus"]] *= [1.4, 0.8]  # AD scans: 40 % larger ventricles, 20 % smaller hippocampi
    arms = {"cn_to_ad": ManipulationArm(3, table=cn), "ad_to_cn": ManipulationArm(3, table=ad)}
    gaps, source = cohort_gap_pct(pd.DataFrame({"diagnosis": ["CN", "AD"]}), arms, ALPHAS)
    assert "atlas volumetry" in source
    assert gaps["cn_to_ad"]["ventricle"] == pytest.approx(40.0) and gaps["cn_to_ad"]["hippocampus"] == pytest.approx(-20.0)
    assert gaps["ad_to_cn"]["ventricle"] == pytest.approx(100 * (1 / 1.4 - 1))
    gaps, source = cohort_gap_pct(pd.DataFrame({"diagnosis": ["CN"]}), {"cn_to_ad": arms["cn_to_ad"]}, ALPHAS)
    assert gaps == {} and source.startswith("unavailable")


class _StubScans:
    """What the sections read of a ScanCache: ``get``, ``batch`` and ``affine`` by row label."""

    def __init__(self, volumes: dict[int, torch.Tensor]) -> None:
        self.volumes = volumes

    def get(self, i: int) -> torch.Tensor:
        return self.volumes[i]

    def batch(self, rows: list[int]) -> torch.Tensor:
        return torch.cat([self.volumes[i] for i in rows])

    def affine(self, i: int) -> np.ndarray:
        return np.diag([6.0, 6.0, 6.0, 1.0])


class _ShrinkingVentricles:
    """A fake model whose manipulation scales the whole image by (1 + k α): the stub volumetry reads
    the ventricles from the mean intensity and the hippocampus from its inverse."""

    def __init__(self, k: float) -> None:
        self.k = k

    def manipulate(self, x: torch.Tensor, direction, alphas, steps) -> torch.Tensor:
        return torch.stack([x * (1 + self.k * float(a)) for a in alphas])


def _stub_measure(items: list[tuple[np.ndarray, np.ndarray]]) -> list[dict[str, float]]:
    return [{"ventricle_ml": 30.0 * float(v.mean()), "hippocampus_ml": 7.0 / float(v.mean())} for v, _ in items]


def _manipulation_cohort() -> tuple[pd.DataFrame, _StubScans]:
    dx = ["CN", "CN", "AD", "AD", "CN", "AD"]
    df = pd.DataFrame({"subject": [f"s{i}" for i in range(6)], "session": 0, "diagnosis": dx,
                       "split": ["test"] * 4 + ["train"] * 2,
                       "ventricle_volume_ml": [25.0 if d == "CN" else 35.0 for d in dx],
                       "hippocampus_volume_ml": [8.0 if d == "CN" else 6.5 for d in dx]})
    g = torch.Generator().manual_seed(0)
    scans = _StubScans({i: 1.0 + 0.1 * torch.rand(1, 1, 12, 12, 12, generator=g) for i in df.index})
    return df, scans


@pytest.mark.parametrize("k, passes", [(-0.05, False), (0.05, True)])
def test_manipulation_section_judges_a_stub_model(tmp_path: Path, k: float, passes: bool) -> None:
    """Through the section: a model that shrinks ventricles when moving to AD (k < 0) fails the checks."""
    from ldae.evaluation.sections.manipulation import manipulation_section

    df, scans = _manipulation_cohort()
    mcfg = {"alphas": ALPHAS, "max_scans": 2, "steps": 2, "min_gap_fraction": 0.25}
    section = manipulation_section(_ShrinkingVentricles(k), scans, df, np.ones(4), mcfg, tmp_path,
                                   measure=_stub_measure)
    out = section.to_json()
    assert out["cn_to_ad"]["n_scans"] == 2 and out["ad_to_cn"]["n_scans"] == 2
    checks = out["checks"]
    assert checks["gap_source"].startswith("ground-truth") and checks["passed"] is passes
    vent = checks["cn_to_ad"]["ventricle"]
    # CN -> AD applies +α: ventricles change by 100 k α %; the gap is +40 %
    assert vent["change_pct"] == pytest.approx([0.0, 150 * k, 300 * k])
    assert vent["fraction_of_gap_at_max_alpha"] == pytest.approx(300 * k / 40.0)
    assert vent["passed"] is passes and checks["ad_to_cn"]["ventricle"]["passed"] is passes
    # the decoding itself: α = 3 scales the image by 1 + 3k, so |Δ| = 3|k| × mean intensity (scans 1.0–1.1)
    change = out["cn_to_ad"]["image_change"]
    mean_x = float(np.mean([scans.get(i).mean() for i in (0, 1)]))
    assert change["mean_abs_difference"] == pytest.approx(3 * abs(k) * mean_x, rel=1e-5)
    assert 0 < change["ssim_max_vs_first_alpha"] < 1
    assert json.loads(json.dumps(out)) == out  # JSON-ready
    assert (tmp_path / "manipulation_cn_to_ad.csv").is_file() and (tmp_path / "manipulation_ad_to_cn.png").is_file()


def _with_noise(table: pd.DataFrame, sd_pct: float, seeds: int = 3) -> pd.DataFrame:
    """``table`` with every image's volume measured under ``seeds`` seeds with an SD of ``sd_pct`` % of it."""
    out = table.copy()
    for r in ("ventricle", "hippocampus"):
        out[f"{r}_sd"] = out[r] * sd_pct / 100
    out["seeds"] = seeds
    return out


def test_change_standard_error_matches_the_closed_form() -> None:
    from ldae.evaluation.sections.manipulation import change_standard_error

    table = _with_noise(_volumes(5.0, -2.0, n=4), sd_pct=2.0, seeds=3)
    # per scan: var = (sd_last² + sd_0²) / (k v_0²) in %²; v_last = v_0 (1 + 0.15) for the ventricles
    per_scan = 2.0**2 * (1.15**2 + 1.0) / 3
    assert change_standard_error(table, ALPHAS, "ventricle") == pytest.approx(np.sqrt(4 * per_scan) / 4)
    assert change_standard_error(table.drop(columns=["seeds"]), ALPHAS, "ventricle") is None
    assert change_standard_error(_with_noise(_volumes(5.0, -2.0), 2.0, seeds=1), ALPHAS, "ventricle") is None


def test_check_fails_a_change_inside_the_volumetry_noise() -> None:
    """15 % ventricle growth and 6 % hippocampal loss at α = 3 (enough of the gap): measured with 1 % noise both
    clear 2 SE; with a 10 % SD per measurement (SE of the mean change ≈ 10 % · √(0.94² + 1) / √3 / √3 ≈ 4.6 %)
    the 6 % does not, the 15 % still does."""
    from ldae.evaluation.sections.manipulation import check_arm

    quiet = check_arm(_with_noise(_volumes(5.0, -2.0), 1.0), ALPHAS, "cn_to_ad", GAP_CN_TO_AD)
    assert all(c.passed and c.clears_noise for c in quiet.values())
    assert quiet["ventricle"].noise_se_pct == pytest.approx(np.sqrt(3 * (1.15**2 + 1) / 3) / 3)
    noisy = check_arm(_with_noise(_volumes(5.0, -2.0), 10.0), ALPHAS, "cn_to_ad", GAP_CN_TO_AD)
    h = noisy["hippocampus"]
    assert h.signed and h.monotonic and h.large_enough and h.clears_noise is False and not h.passed
    assert "within 2 SE" in h.reason and "volumetry's own noise" in h.reason
    assert h.noise_se_pct == pytest.approx(10 * np.sqrt(0.94**2 + 1) / 3) and noisy["ventricle"].passed
    # a stricter multiple fails the quiet run too; no seeds column: noise unknown, not a failure
    strict = check_arm(_with_noise(_volumes(5.0, -2.0), 1.0), ALPHAS, "cn_to_ad", GAP_CN_TO_AD, noise_multiple=20)
    assert not strict["hippocampus"].passed
    plain = check_arm(_volumes(5.0, -2.0), ALPHAS, "cn_to_ad", GAP_CN_TO_AD)["ventricle"]
    assert plain.passed and plain.clears_noise is None and plain.noise_se_pct is None


def test_manipulation_config_errors_are_caught_before_decoding() -> None:
    from ldae.errors import ConfigError
    from ldae.evaluation.sections.manipulation import check_manipulation_config

    check_manipulation_config({"volumetry_seeds": [1, 2], "noise_multiple": 2.0})
    for bad, match in (({"volumetry_seeds": [0, 1]}, "volumetry_seeds.*'seed from the clock'"),
                       ({"volumetry_seeds": [1, 1]}, "distinct"), ({"volumetry_seeds": []}, "volumetry_seeds"),
                       ({"noise_multiple": -1}, "noise_multiple"), ({"min_gap_fraction": float("nan")}, "min_gap"),
                       ({"volumetry": {"seed": 0}}, "volumetry.seed")):
        with pytest.raises(ConfigError, match=match):
            check_manipulation_config(bad)


def test_manipulation_section_measures_the_noise_with_the_stub(tmp_path: Path) -> None:
    """A stub volumetry that reports a per-image SD over its seeds: a model whose changes are real but small
    against that SD fails on noise alone, the same model measured precisely passes."""
    from ldae.evaluation.sections.manipulation import manipulation_section

    df, scans = _manipulation_cohort()
    mcfg = {"alphas": ALPHAS, "max_scans": 2, "steps": 2, "min_gap_fraction": 0.25}

    def measure(sd_pct):
        def f(items):
            return [{**m, "ventricle_ml_sd": m["ventricle_ml"] * sd_pct / 100,
                     "hippocampus_ml_sd": m["hippocampus_ml"] * sd_pct / 100, "seeds": [1, 2, 3]}
                    for m in _stub_measure(items)]
        return f

    precise = manipulation_section(_ShrinkingVentricles(0.05), scans, df, np.ones(4), mcfg, tmp_path,
                                   measure=measure(0.5)).to_json()["checks"]
    assert precise["passed"] and precise["noise_multiple"] == 2.0
    noisy = manipulation_section(_ShrinkingVentricles(0.05), scans, df, np.ones(4), mcfg, tmp_path,
                                 measure=measure(40.0)).to_json()["checks"]
    assert not noisy["passed"] and noisy["cn_to_ad"]["ventricle"]["clears_noise"] is False
    table = pd.read_csv(tmp_path / "manipulation_cn_to_ad.csv")
    assert {"ventricle_sd", "hippocampus_sd", "seeds"} <= set(table.columns)


def test_class_separation_in_alpha_units() -> None:
    """Codes built so that the normalised coordinate along the direction is known: AD at +1, CN at −1 (train),
    so AD − CN = 2 and α = 3 is 1.5 times it; the test split's groups sit at ±0.25."""
    from ldae.evaluation.sections.manipulation import class_separation

    rng = np.random.default_rng(0)
    d = rng.normal(size=8)
    u = d / np.linalg.norm(d)
    mean, std = rng.normal(size=8), rng.uniform(0.5, 2.0, size=8)
    dx = ["AD", "CN", "AD", "CN", "MCI", "AD", "CN"]
    split = ["train"] * 5 + ["test"] * 2
    coord = np.array([1.0, -1.0, 1.0, -1.0, 9.0, 0.25, -0.25])
    other = rng.normal(size=(7, 8))
    other -= np.outer(other @ u, u)  # orthogonal to the direction: must not matter
    y = (other + np.outer(coord, u)) * std + mean
    df = pd.DataFrame({"diagnosis": dx, "split": split})
    out = class_separation(y, df, mean, std, 5.0 * d, alpha_max=3.0)
    assert out["train"]["ad_minus_cn"] == pytest.approx(2.0) and out["train"]["within_sd"] == pytest.approx(0.0, abs=1e-9)
    assert out["train"]["n_ad"] == 2 and out["train"]["n_cn"] == 2
    assert out["test"]["ad_minus_cn"] == pytest.approx(0.5) and out["alpha_max_over_separation"] == pytest.approx(1.5)
    assert "test" not in class_separation(y[:5], df.iloc[:5], mean, std, d)


# ----------------------------------------------------------------------------------- interpolation
class _LinearModel:
    """A fake LDAE whose autoencoder and diffusion are perfect: compress/decompress are the identity,
    encode returns (mean intensity, the volume) and decode returns z_T."""

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def decompress(self, z: torch.Tensor) -> torch.Tensor:
        return z.clone()

    def encode(self, x: torch.Tensor, steps: int, semantic: bool = True):
        return x.flatten(1).mean(1, keepdim=True), x.clone()  # per scan of the batch

    def decode(self, y, z: torch.Tensor, steps: int) -> torch.Tensor:
        return z.clone()


def test_interpolation_section_scores_every_baseline_against_the_true_scan() -> None:
    from ldae.evaluation.sections.interpolation import METHODS, interpolation_section

    months = (0, 12, 24)
    df = pd.DataFrame([(f"s{i}", m, "test") for i in range(3) for m in months], columns=["subject", "session", "split"])
    g = torch.Generator().manual_seed(1)
    vols = {}
    for i in range(3):
        start, end = torch.rand(2, 1, 1, 16, 16, 16, generator=g)
        for j, m in enumerate(months):  # visits on a straight line in time: LERP is exact
            vols[3 * i + j] = start + (end - start) * m / 24
    section = interpolation_section(_LinearModel(), _StubScans(vols), df, steps=2, max_triplets=None)
    summary = section.to_json()
    assert list(summary) == list(METHODS) and all(summary[m]["n_triplets"] == 3 for m in METHODS)
    # the identity autoencoder reconstructs the true scan, and LERP of the latents is exact here
    assert summary["autoencoder_target"]["ssim"] == pytest.approx(1.0) and summary["autoencoder_target"]["mse"] == 0
    assert summary["latent_lerp"]["mse"] == pytest.approx(0.0, abs=1e-12)
    # copying the nearest visit and its perfect "LDAE reconstruction" are the same image
    assert summary["nearest_visit"]["mse"] == pytest.approx(summary["ldae_nearest_visit"]["mse"])
    assert summary["nearest_visit"]["mse"] > 1e-3
    comparison = {(p["method"], p["versus"], p["metric"]): p for p in section.comparison_json()["pairs"]}
    assert comparison["nearest_visit", "latent_lerp", "mse"]["winner"] == "latent_lerp"
    assert comparison["nearest_visit", "ldae_nearest_visit", "mse"]["winner"] is None
    assert section.comparison_json()["reference"].startswith("input scan")
    # batching the inversions and decodings changes nothing: one scan at a time gives the same table
    one = interpolation_section(_LinearModel(), _StubScans(vols), df, steps=2, max_triplets=None, batch_size=1)
    pd.testing.assert_frame_equal(one.scores, section.scores)
