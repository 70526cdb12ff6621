"""The main job: bundled cohort -> tiny pipeline -> evaluation -> ``report.html`` + ``metrics.json``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ldae.config import configs_root, load_settings
from ldae.io import write_json
from ldae.jobs.pipeline import DEFAULT_STEPS
from ldae.runs import stage_dir

log = logging.getLogger(__name__)
#: what LDAE's interpolation must beat, in words (``aims.interpolation_must_beat``)
BASELINE_WORDS = {"nearest_visit": "copying the nearest visit",
                  "ldae_nearest_visit": "the LDAE reconstruction of the nearest visit",
                  "latent_lerp": "LERP of the autoencoder latents",
                  "autoencoder_target": "the autoencoder reconstruction of the missing visit"}
REGION_WORDS = {"ventricle": "ventricles", "hippocampus": "hippocampus"}
#: the run folder of each step of the pipeline the demo runs (compress writes the latents)
STEP_FOLDERS = {step: "latents" if step == "compress" else step for step in DEFAULT_STEPS}


def probe_auc(probe: dict, name: str, key: str = "auc") -> float | None:
    """One AD-vs-CN number (``auc`` on the test split, ``cv_auc_best`` in train-split CV) of feature set
    ``name`` in the evaluation's ``probe`` section; None when that set or number was not measured."""
    return probe.get(name, {}).get("ad_vs_cn", {}).get(key)


def judged(aim: str, value: float, value_cv: float | None, ok: Callable[[float], bool]) -> dict[str, Any]:
    """An aim judged on two estimates (test split ``value``, train-split CV ``value_cv``): met only when both
    meet it (the test split alone when there is no CV estimate)."""
    met = ok(value) and (value_cv is None or ok(value_cv))
    return {"aim": aim, "value": value, "value_cv": value_cv, "met": bool(met)}


def check_aims(metrics: dict, aims: dict) -> list[dict[str, Any]]:
    """The demo's success criteria, each with its measured value and whether it is met.

    The AUC aims are judged twice, on the test split (``value``) and on the train split's subject-grouped
    cross-validation (``value_cv``), and are met only when both estimates meet them: the demo's test split
    holds about a dozen AD/CN subjects, on which the AUC's 95 % interval is about ±0.4 wide.

    Then what stage 3 must learn (:func:`representation_aims`: factor R², AUC over both controls,
    semantic-only own vs other, LDAE vs LDDIM).

    Interpolation: for each baseline in ``aims.interpolation_must_beat``, LDAE's missing-visit SSIM minus the
    baseline's (``value``, mean paired difference) must have its whole 95 % subject-bootstrap interval
    (``interval``) above zero. Manipulation: one aim per arm and structure, ``value`` = the fraction of the
    cohort's AD−CN gap covered at the largest α, met only when the evaluation's signed, sized check passed
    (:func:`ldae.evaluation.sections.manipulation.check_arm`).
    """
    out = []
    probe = metrics.get("probe", {})

    def auc(name: str, key: str = "auc") -> float | None:
        return probe_auc(probe, name, key)

    def cv_diff(a: str, b: str) -> float | None:
        x, y = auc(a, "cv_auc_best"), auc(b, "cv_auc_best")
        return None if x is None or y is None else x - y

    learned = auc("learned")
    if learned is not None and "oracle" in probe:
        limit = aims["auc_gap_to_oracle_max"]
        out.append(judged(f"learned AUC within {limit} of the oracle (gap)", auc("oracle") - learned,
                          cv_diff("oracle", "learned"), lambda v: v <= limit))
    if learned is not None and "untrained" in probe:
        limit = aims["auc_gain_over_untrained_min"]
        out.append(judged(f"learned AUC at least {limit} above the untrained encoder (gain)",
                          learned - auc("untrained"), cv_diff("learned", "untrained"), lambda v: v >= limit))
    out += representation_aims(metrics, aims)
    recon = metrics.get("reconstruction", {})
    if recon.get("autoencoder") and recon.get("ldae_encoded"):
        best = max(recon["ldae_encoded"], key=lambda k: recon["ldae_encoded"][k]["ssim"])
        gap = recon["autoencoder"]["ssim"] - recon["ldae_encoded"][best]["ssim"]
        out.append({"aim": f"LDAE encoded SSIM ({best} steps) within {aims['ldae_vs_ae_ssim_gap_max']} of the autoencoder's (gap)",
                    "value": gap, "met": bool(gap <= aims["ldae_vs_ae_ssim_gap_max"])})
    pairs = (metrics.get("interpolation_comparison") or {}).get("pairs") or []
    for versus in aims.get("interpolation_must_beat") or []:
        pair = next((p for p in pairs if p["method"] == "ldae" and p["versus"] == versus and p["metric"] == "ssim"), None)
        if pair is not None:
            out.append({"aim": f"LDAE interpolation SSIM above {BASELINE_WORDS.get(versus, versus)} "
                               "(missing visit; paired difference, 95% CI over subjects above 0)",
                        "value": pair["mean_difference"], "interval": pair["ci95"], "met": pair["winner"] == "ldae"})
    man = metrics.get("manipulation") or {}
    checks = man.get("checks") or {}
    top = f"{max(man['alphas']):g}" if man.get("alphas") else "max"
    for arm, words in (("cn_to_ad", "CN→AD"), ("ad_to_cn", "AD→CN")):
        for region, c in (checks.get(arm) or {}).items():
            out.append({"aim": f"manipulation {words}: {REGION_WORDS.get(region, region)} {c['expected']}, at α={top} at "
                               f"least {checks.get('min_gap_fraction')} of the cohort's AD−CN gap (fraction)",
                        "value": c["fraction_of_gap_at_max_alpha"], "met": bool(c["passed"]),
                        **({"note": c["reason"]} if c.get("reason") else {})})
    return out


def representation_aims(metrics: dict, aims: dict) -> list[dict[str, Any]]:
    """What stage 3 must learn (the aims of "y_sem >= the linear baselines"), each judged on the run's metrics.

    * ``factor_r2``: per factor column, the learned y_sem's R² of its ridge probe must reach ``min`` (an
      absolute floor) and/or latent PCA's R² + ``vs_latent_pca`` (a margin, negative = allowed shortfall):
      the information is in the autoencoder's latents, so y_sem must keep it. Judged on the test split and
      on the train split's nested subject-grouped CV R² (``cv_r2``), met only when both meet it;
    * ``auc_gain_over_controls_min``: learned AD-vs-CN AUC >= max(untrained encoder, latent PCA) + the margin,
      on the test split and in train-split CV (both estimates, as the other AUC aims; each against the
      stronger control of that estimate);
    * ``semantic_own_vs_other_min``: semantic-only reconstruction SSIM with the scan's own y_sem minus with
      another subject's, at the largest step count both were measured at: how much of the scan y_sem decides;
    * ``ldae_beats_lddim_at_steps``: LDAE encoded reconstruction SSIM above the unconditional DDIM
      inversion's (LDDIM) at each of these step counts: the semantics must help decoding.

    An aim whose inputs the run did not measure is left out (a run without those evaluation sections)."""
    out: list[dict[str, Any]] = []
    factors = metrics.get("factors") or {}  # {feature set: {column: fit}} (+ "skipped")
    learned, pca = factors.get("learned") or {}, factors.get("latent_pca") or {}
    for col, rule in (aims.get("factor_r2") or {}).items():
        mine, ref = learned.get(col) or {}, pca.get(col) or {}
        r2, r2_cv = mine.get("r2"), mine.get("cv_r2")
        if r2 is None:
            continue
        if "min" in rule:
            floor = float(rule["min"])
            out.append(judged(f"y_sem {col} R² at least {floor:g}", float(r2), r2_cv, lambda v, f=floor: v >= f))
        if "vs_latent_pca" in rule and ref.get("r2") is not None:
            margin = float(rule["vs_latent_pca"])
            cv = None if r2_cv is None or ref.get("cv_r2") is None else float(r2_cv - ref["cv_r2"])
            out.append(judged(f"y_sem {col} R² minus latent PCA's ({ref['r2']:.3f}), at least {margin:g}",
                              float(r2 - ref["r2"]), cv, lambda v, m=margin: v >= m))
    probe = metrics.get("probe") or {}
    gain = aims.get("auc_gain_over_controls_min")
    controls = [c for c in ("untrained", "latent_pca") if c in probe]
    if gain is not None and "learned" in probe and controls:
        def margin(key: str) -> float | None:
            values = [probe_auc(probe, n, key) for n in ("learned", *controls)]
            return None if any(v is None for v in values) else values[0] - max(values[1:])

        test = margin("auc")
        if test is not None:
            aim = f"learned AUC at least {gain:g} above the best of {' and '.join(controls)} (gain)"
            out.append(judged(aim, test, margin("cv_auc_best"), lambda v: v >= float(gain)))
    recon = metrics.get("reconstruction") or {}
    own, other = recon.get("ldae_semantic") or {}, recon.get("ldae_semantic_other") or {}
    both = sorted((s for s in own if s in other), key=int)
    limit = aims.get("semantic_own_vs_other_min")
    if limit is not None and both:
        s = both[-1]
        diff = own[s]["ssim"] - other[s]["ssim"]
        ae, ae_other = recon.get("autoencoder") or {}, recon.get("autoencoder_other") or {}
        bound = (f"; at most {ae['ssim'] - ae_other['ssim']:.3f} (autoencoder of the scan minus of the other "
                 "subject's)" if "ssim" in ae and "ssim" in ae_other else "")
        scale = float(metrics.get("guidance_scale", 1.0))
        out.append({"aim": f"semantic-only SSIM ({s} steps, guidance scale {scale:g}), own y_sem minus another "
                           f"subject's, at least {limit:g}{bound}", "value": float(diff), "met": bool(diff >= float(limit))})
    ldae, lddim = recon.get("ldae_encoded") or {}, recon.get("lddim_encoded") or {}
    for steps in aims.get("ldae_beats_lddim_at_steps") or []:
        s = str(steps)
        if s in ldae and s in lddim:
            diff = ldae[s]["ssim"] - lddim[s]["ssim"]
            out.append({"aim": f"LDAE encoded SSIM above LDDIM's (unconditional DDIM inversion) at {s} steps "
                               "(difference)", "value": float(diff), "met": bool(diff > 0)})
    return out


def run_demo(out: str | Path, seed: int | None = None, subjects: int | None = None,
             overrides: list[str] | None = None) -> Path:
    """Synthesize the cohort, run the tiny pipeline and write ``out/report.html`` + ``out/metrics.json``."""
    from ldae.data.cohort import read_cohort, summarize
    from ldae.data.synthetic import load_synth_config, synthesize
    from ldae.jobs.pipeline import run_pipeline
    from ldae.report import load_metrics, write_report

    cfg = load_settings(configs_root() / "demo.yaml")
    if seed is not None:
        cfg["seed"] = int(seed)
    out = Path(out)
    t_all = time.perf_counter()
    c = cfg["cohort"]
    cohort_dir = out / "cohort"
    log.info("demo: synthesizing %d subjects at %s mm into %s", subjects or c["subjects"], c["spacing"], cohort_dir)
    t0 = time.perf_counter()
    synth_cfg = load_synth_config(overrides=list((c.get("synth_overrides") or {}).items()))
    synth = synthesize(cohort_dir, n_subjects=int(subjects or c["subjects"]), seed=int(cfg["seed"]),
                       shape=c["shape"], spacing=float(c["spacing"]), cfg=synth_cfg, progress=True)
    timings: dict[str, float] = {"synth": time.perf_counter() - t0}
    run = out / "run"
    run_pipeline(cfg["preset"], synth.csv, run, overrides=[*cfg.get("overrides", []), *(overrides or [])])
    for step, folder in STEP_FOLDERS.items():  # include stages finished by an earlier (resumed) demo
        done = stage_dir(run, folder) / "done.json"
        if done.is_file():
            import json

            timings[step] = float(json.loads(done.read_text())["seconds"])
    metrics = load_metrics(run)
    metrics["timings_s"] = {"stages": timings, "evaluation_sections": metrics.get("timings_s", {}),
                            "total": time.perf_counter() - t_all}
    summary = summarize(read_cohort(synth.csv))
    summary["ground_truth_auc"] = synth.auc
    metrics["cohort"] = {**metrics.get("cohort", {}), **summary}
    metrics["aims"] = check_aims(metrics, cfg["aims"])
    write_json(out / "metrics.json", metrics)
    report = write_report(run, out / "report.html", metrics, cohort_summary=summary, title="LDAE demo (tiny preset, bundled cohort)")
    return report
