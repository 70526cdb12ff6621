"""``manipulation`` section: CN test scans moved towards AD (+α) and AD scans towards CN (−α) along the
AD-vs-CN probe's direction; ventricle/hippocampus volume change (%) vs the first α by atlas propagation
(:mod:`ldae.evaluation.volumetry`), and the same volumetry checked against ground truth when present.

A manipulation that merely changes volumes monotonically proves nothing: :func:`check_arm` checks the
sign of each change against what the disease does (CN -> AD: ventricles grow, hippocampi shrink; AD -> CN
the reverse), its size against the cohort's own AD−CN difference (:func:`cohort_gap_pct`), and against
the volumetry's own noise: every image is measured under ``volumetry_seeds`` ANTs seeds
(:func:`ldae.evaluation.volumetry.measure_volumes_seeds`), the volume is the mean, and the change at the
largest α must exceed ``noise_multiple`` standard errors of that mean (:func:`change_standard_error`), see
:class:`ldae.evaluation.results.RegionCheck`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ldae.evaluation.results import (
    ManipulationArm,
    ManipulationChecks,
    ManipulationSection,
    RegionCheck,
    VolumetryCheck,
)
from ldae.evaluation.sections.common import GT_VOLUMES, ScanCache, progress, scores
from ldae.io import write_csv

REGIONS = ("ventricle", "hippocampus")
#: (arm name, source diagnosis, sign of α)
ARMS = (("cn_to_ad", "CN", 1.0), ("ad_to_cn", "AD", -1.0))
#: the sign each region's volume must change with when moving towards the arm's target diagnosis
EXPECTED_SIGN = {"cn_to_ad": {"ventricle": 1, "hippocampus": -1}, "ad_to_cn": {"ventricle": -1, "hippocampus": 1}}
#: default share of the cohort's AD−CN gap the largest α must cover (``manipulation.min_gap_fraction``)
MIN_GAP_FRACTION = 0.25
#: default ANTs seeds each image is measured under (``manipulation.volumetry_seeds``)
VOLUMETRY_SEEDS = (1, 2, 3)
#: default number of standard errors the largest change must clear (``manipulation.noise_multiple``)
NOISE_MULTIPLE = 2.0
#: measures volumes of ``[(volume (D, H, W), affine)]`` -> ``[{"ventricle_ml": ..., "hippocampus_ml": ...}]``
#: (optionally with ``"<region>_ml_sd"``, the SD over the seeds the volume is the mean of, and ``"seeds"``)
Measure = Callable[[list[tuple[np.ndarray, np.ndarray]]], list[dict[str, Any]]]


def check_manipulation_config(mcfg: dict) -> None:
    """Reject bad ``manipulation`` settings before any scan is decoded (ConfigError naming the key)."""
    import math

    from ldae.data.ants import check_seeds
    from ldae.errors import ConfigError
    from ldae.evaluation.volumetry import VolumetryConfig

    VolumetryConfig.from_dict(mcfg.get("volumetry"))
    check_seeds(mcfg.get("volumetry_seeds", VOLUMETRY_SEEDS), "manipulation.volumetry_seeds")
    for key, default in (("noise_multiple", NOISE_MULTIPLE), ("min_gap_fraction", MIN_GAP_FRACTION)):
        value = mcfg.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"manipulation.{key}: must be a finite number >= 0, got {value!r}")


def atlas_volumetry(mcfg: dict) -> Measure:
    """Atlas-propagation volumetry with the section's ``volumetry`` settings, each image under every seed of
    ``volumetry_seeds`` (one ITK thread per worker: each measurement repeats exactly)."""
    from ldae.evaluation.volumetry import VolumetryConfig, measure_volumes_seeds

    vcfg = VolumetryConfig.from_dict(mcfg.get("volumetry"))
    seeds = mcfg.get("volumetry_seeds", VOLUMETRY_SEEDS)
    return lambda items: measure_volumes_seeds(items, vcfg, seeds)


def _monotonic(values: list[float]) -> bool:
    """True when the sequence never changes direction."""
    d = np.diff(np.asarray(values, dtype=float))
    return bool(np.all(d >= 0) or np.all(d <= 0))


def volume_changes(table: pd.DataFrame, alphas: list[float]) -> dict[str, dict[str, float]]:
    """Mean over scans of the relative volume change (%) at each α against the first α, per region:
    ``{f"{α:g}": {"ventricle_change_pct": ..., "hippocampus_change_pct": ...}}``; ``table`` has columns
    ``row, alpha, ventricle, hippocampus``."""
    base = table[table["alpha"] == alphas[0]].set_index("row")
    out = {}
    for a in alphas:
        cur = table[table["alpha"] == a].set_index("row")
        out[f"{a:g}"] = {f"{r}_change_pct": float(((cur[r] - base[r]) / base[r]).mean() * 100.0) for r in REGIONS}
    return out


def manipulation_section(model: Any, scans: ScanCache, df: pd.DataFrame, direction: np.ndarray,
                         mcfg: dict, out: Path, measure: Measure | None = None) -> ManipulationSection:
    """Regional volume change along the AD direction (CN -> AD with +α, AD -> CN with −α); writes
    ``manipulation_<arm>.csv`` (measured volumes) and ``manipulation_<arm>.png`` (strip of the first scan).
    ``measure`` defaults to :func:`atlas_volumetry`."""
    measure = measure or atlas_volumetry(mcfg)
    alphas = [float(a) for a in mcfg["alphas"]]
    test = df[df["split"] == "test"]
    arms: dict[str, ManipulationArm] = {}
    strips: dict[str, tuple[list, list]] = {}
    for name, source, sign in ARMS:
        rows = test.index[test["diagnosis"] == source].tolist()[: int(mcfg["max_scans"])]
        if not rows:
            arms[name] = ManipulationArm(n_scans=0)
            continue
        items, keys, ssims, maes = [], [], [], []
        for i in progress(rows, f"manipulating {source} scans"):
            vols = model.manipulate(scans.get(i), direction, [sign * a for a in alphas], int(mcfg["steps"]))
            ssims.append(float(scores(vols[-1], vols[0])["ssim"].mean()))
            maes.append(float((vols[-1] - vols[0]).abs().mean()))
            if i == rows[0]:
                strips[name] = ([scans.get(i)[0], *[v[0] for v in vols]], ["input", *[f"α={sign * a:+.1f}" for a in alphas]])
            for a, v in zip(alphas, vols):
                items.append((v[0, 0].cpu().numpy(), scans.affine(i)))
                keys.append((i, a))
        measured = measure(items)
        table = pd.DataFrame([{"row": k[0], "alpha": k[1], **{r: m[f"{r}_ml"] for r in REGIONS},
                               **{f"{r}_sd": m.get(f"{r}_ml_sd", 0.0) for r in REGIONS},
                               "seeds": len(m.get("seeds", [None]))}
                              for k, m in zip(keys, measured)])
        changes = volume_changes(table, alphas)
        vent = [changes[f"{a:g}"]["ventricle_change_pct"] for a in alphas]
        hip = [changes[f"{a:g}"]["hippocampus_change_pct"] for a in alphas]
        arms[name] = ManipulationArm(len(rows), changes, _monotonic(vent), _monotonic(hip), table,
                                     {"ssim_max_vs_first_alpha": float(np.mean(ssims)),
                                      "mean_abs_difference": float(np.mean(maes))})
        write_csv(out / f"manipulation_{name}.csv", table)
    from ldae.viz import save_strip

    for name, (vols, labels) in strips.items():
        save_strip(out / f"manipulation_{name}.png", vols, labels, diff_to=1, title=name.replace("_", " → "))
    gaps, source = cohort_gap_pct(df, arms, alphas)
    min_fraction = float(mcfg.get("min_gap_fraction", MIN_GAP_FRACTION))
    multiple = float(mcfg.get("noise_multiple", NOISE_MULTIPLE))
    checks = ManipulationChecks(min_fraction, source, {
        name: check_arm(arm.table, alphas, name, gaps.get(name, {}), min_fraction, multiple)
        for name, arm in arms.items() if arm.n_scans and arm.table is not None}, noise_multiple=multiple)
    return ManipulationSection(alphas, "unit AD-vs-CN probe direction in normalised y_sem", arms, checks=checks)


def class_separation(y_sem: np.ndarray, df: pd.DataFrame, mean: np.ndarray, std: np.ndarray,
                     direction: np.ndarray, alpha_max: float | None = None) -> dict[str, Any]:
    """Where AD and CN scans lie along the manipulation direction, in the α units of ``LDAE.manipulate``.

    With ``u = d / |d|`` and the normalised code ``ŷ = (y − mean) / std``, each scan's coordinate is ``p = ŷ·u``;
    a step α moves it to ``p + α``. Per split: ``ad_minus_cn`` = mean p of AD scans − mean p of CN scans (the
    distance from the CN group to the AD group along the direction), ``within_sd`` = the pooled within-group SD
    of p, and the group sizes. ``alpha_max_over_separation`` (train split) says how many times that distance
    the largest α moves: below ``min_gap_fraction`` a faithful decoder could not pass the size check, far above 1
    the step leaves the data. ``y_sem``: ``(n, d)`` rows aligned with ``df``."""
    u = np.asarray(direction, dtype=float).reshape(-1)
    u = u / np.linalg.norm(u)
    p = ((np.asarray(y_sem, dtype=float) - np.asarray(mean, dtype=float)) / np.asarray(std, dtype=float)) @ u
    dx = df["diagnosis"].astype(str).to_numpy()
    split = df["split"].astype(str).to_numpy() if "split" in df.columns else np.array(["train"] * len(df))
    out: dict[str, Any] = {}
    for name in ("train", "test"):
        ad, cn = p[(split == name) & (dx == "AD")], p[(split == name) & (dx == "CN")]
        if len(ad) and len(cn):
            pooled = np.sqrt(((len(ad) - 1) * ad.var(ddof=1) + (len(cn) - 1) * cn.var(ddof=1))
                             / max(len(ad) + len(cn) - 2, 1)) if len(ad) + len(cn) > 2 else None
            out[name] = {"ad_minus_cn": float(ad.mean() - cn.mean()),
                         "within_sd": None if pooled is None else float(pooled), "n_ad": int(len(ad)), "n_cn": int(len(cn))}
    train = out.get("train", {}).get("ad_minus_cn")
    out["alpha_max_over_separation"] = (float(alpha_max / train) if alpha_max is not None and train else None)
    return out


def cohort_gap_pct(df: pd.DataFrame, arms: dict[str, ManipulationArm] | None = None,
                   alphas: list[float] | None = None) -> tuple[dict[str, dict[str, float]], str]:
    """The cohort's own AD−CN difference per region as the change (%) each arm should aim at:
    ``cn_to_ad``: ``100 (mean_AD - mean_CN) / mean_CN``; ``ad_to_cn``: ``100 (mean_CN - mean_AD) / mean_AD``.

    From the ground-truth volume columns over all CN and AD scans of the cohort when it has them; else
    from the atlas volumetry of both arms' first-α decodings (the same measurement as the changes);
    ``({}, reason)`` when neither is available. Returns ``(gaps, source)``."""
    means: dict[str, dict[str, float]] = {}
    source = "unavailable: no ground-truth volumes and not both CN and AD test scans"
    dx = df["diagnosis"].astype(str)
    if all(f"{r}_volume_ml" in df.columns for r in REGIONS) and (dx == "CN").any() and (dx == "AD").any():
        means = {g: {r: float(pd.to_numeric(df.loc[dx == g, f"{r}_volume_ml"]).mean()) for r in REGIONS}
                 for g in ("CN", "AD")}
        source = "ground-truth volume columns, all CN and AD scans of the cohort"
    elif arms and alphas:
        for name, group in (("cn_to_ad", "CN"), ("ad_to_cn", "AD")):
            arm = arms.get(name)
            if arm is not None and arm.n_scans and arm.table is not None:
                first = arm.table[arm.table["alpha"] == alphas[0]]
                means[group] = {r: float(first[r].mean()) for r in REGIONS}
        if len(means) == 2:
            source = "atlas volumetry of the first-α decodings of the manipulated CN and AD test scans"
    if len(means) != 2:
        return {}, source
    cn, ad = means["CN"], means["AD"]
    gaps = {"cn_to_ad": {r: 100.0 * (ad[r] - cn[r]) / cn[r] for r in REGIONS},
            "ad_to_cn": {r: 100.0 * (cn[r] - ad[r]) / ad[r] for r in REGIONS}}
    return gaps, source


def change_standard_error(table: pd.DataFrame, alphas: list[float], region: str) -> float | None:
    """Standard error (percentage points) of the mean change at the largest α that the volumetry's own noise
    alone would give, from the per-image SD over seeds (``<region>_sd`` and ``seeds`` columns).

    Scan i's volume at α is the mean of k seeded measurements with SD s_i(α), so its change
    c_i = 100 (v_i(α_max) − v_i(α₀)) / v_i(α₀) has variance ≈ 100² (s_i(α_max)² + s_i(α₀)²) / (k v_i(α₀)²),
    and the mean over n scans ``SE = sqrt(Σ_i var_i) / n``. None without at least two seeds."""
    col = f"{region}_sd"
    if col not in table.columns or "seeds" not in table.columns or int(table["seeds"].min()) < 2:
        return None
    base = table[table["alpha"] == alphas[0]].set_index("row")
    last = table[table["alpha"] == alphas[-1]].set_index("row")
    k = base["seeds"].astype(float)
    var = 100.0**2 * (last[col] ** 2 + base[col] ** 2) / (k * base[region] ** 2)
    return float(np.sqrt(var.sum()) / len(var))


def check_arm(table: pd.DataFrame, alphas: list[float], arm: str, gap_pct: dict[str, float],
              min_gap_fraction: float = MIN_GAP_FRACTION,
              noise_multiple: float = NOISE_MULTIPLE) -> dict[str, RegionCheck]:
    """:class:`~ldae.evaluation.results.RegionCheck` per region of one arm from its measured volumes
    (``table``: ``row, alpha, ventricle, hippocampus``, one row per scan and α magnitude, the first α
    being the reference; optional ``<region>_sd`` and ``seeds``, see :func:`change_standard_error`) and
    the cohort's gap (%) per region for this arm (:func:`cohort_gap_pct`)."""
    changes = volume_changes(table, alphas)
    steps = np.asarray(alphas, dtype=float) - float(alphas[0])
    base = table[table["alpha"] == alphas[0]].set_index("row")
    last = table[table["alpha"] == alphas[-1]].set_index("row")
    out: dict[str, RegionCheck] = {}
    for region in REGIONS:
        sign = EXPECTED_SIGN[arm][region]
        c = np.array([changes[f"{a:g}"][f"{region}_change_pct"] for a in alphas])
        per_scan = ((last[region] - base[region]) / base[region]).to_numpy(dtype=float)
        signed = len(c) > 1 and bool(np.all(sign * c[1:] > 0))
        monotonic = len(c) > 1 and _monotonic(list(c))
        gap = gap_pct.get(region)
        per_alpha = at_max = None
        large: bool | None = None
        reasons = []
        if len(c) < 2:
            reasons.append("needs at least two α")
        if gap is not None and gap != 0 and len(c) > 1:
            slope = float(np.dot(steps, c) / np.dot(steps, steps)) if np.dot(steps, steps) > 0 else 0.0
            per_alpha, at_max = slope / gap, float(c[-1] / gap)
            if sign * gap > 0:
                large = bool(at_max >= min_gap_fraction)
            else:
                reasons.append(f"the cohort's own gap ({gap:+.2f} %) is not in the expected direction")
        elif len(c) > 1:
            reasons.append("no AD−CN gap to size the change against")
        if len(c) > 1 and not signed:
            reasons.append("moves the wrong way" if np.all(sign * c[1:] < 0) else "not every step moves the expected way")
        if len(c) > 1 and not monotonic:
            reasons.append("turns back along α")
        if large is False:
            reasons.append(f"largest step covers {at_max:.2f} of the gap (< {min_gap_fraction:g})")
        se = change_standard_error(table, alphas, region) if len(c) > 1 else None
        clears: bool | None = None
        if se is not None:
            clears = bool(abs(c[-1]) >= noise_multiple * se)
            if not clears:
                reasons.append(f"the change ({c[-1]:+.2f} %) is within {noise_multiple:g} SE ({se:.2f} %) of the "
                               "volumetry's own noise")
        passed = signed and monotonic and large is True and clears is not False
        out[region] = RegionCheck(
            region=region, expected="up" if sign > 0 else "down", change_pct=[float(v) for v in c], gap_pct=gap,
            fraction_of_gap_per_alpha=per_alpha, fraction_of_gap_at_max_alpha=at_max, noise_se_pct=se,
            clears_noise=clears,
            scans_in_expected_direction=float(np.mean(sign * per_scan > 0)) if len(per_scan) else 0.0,
            signed=signed, monotonic=monotonic, large_enough=large, passed=passed, reason="; ".join(reasons))
    return out


def volumetry_check(scans: ScanCache, df: pd.DataFrame, mcfg: dict, max_scans: int = 8,
                    measure: Measure | None = None) -> VolumetryCheck | None:
    """Correlation of atlas-propagation volumes with the ground-truth columns on real test scans."""
    if not all(c in df.columns for c in GT_VOLUMES[:2]):
        return None
    rows = df.index[df["split"] == "test"].tolist()[:max_scans]
    if len(rows) < 3:
        return None
    # a correlation over scans needs no per-image noise estimate: the first seed only
    seeds = list(mcfg.get("volumetry_seeds", VOLUMETRY_SEEDS))[:1]
    measure = measure or atlas_volumetry({**mcfg, "volumetry_seeds": seeds})
    measured = measure([(scans.get(i)[0, 0].cpu().numpy(), scans.affine(i)) for i in rows])
    r: dict[str, float | None] = {}
    for region in REGIONS:
        m = np.array([x[f"{region}_ml"] for x in measured])
        gt = df.loc[rows, f"{region}_volume_ml"].to_numpy(dtype=float)
        r[region] = float(np.corrcoef(m, gt)[0, 1]) if m.std() > 0 and gt.std() > 0 else None
    return VolumetryCheck(len(rows), r["ventricle"], r["hippocampus"])
