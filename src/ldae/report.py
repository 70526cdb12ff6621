"""Self-contained HTML report of a run (figures embedded as base64 PNG): cohort, training curves,
reconstructions and the recon table, variations, interpolation, missing-timepoint prediction,
manipulation, probes, timings. Reads only files the pipeline and ``ldae evaluate`` wrote."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from ldae.config import STAGES
from ldae.io import write_text
from ldae.runs import stage_dir

#: probe feature sets in table order (those a run lacks are left out)
FEATURE_SETS = ("learned", "untrained", "latent_pca", "voxel_pca", "oracle")
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;
line-height:1.45;padding:0 1em}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em} th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:.9em;color:#555}
.kpi{display:flex;gap:1em;flex-wrap:wrap} .kpi div{background:#f6f8fa;border:1px solid #ddd;border-radius:6px;padding:.6em 1em}
.kpi b{display:block;font-size:1.5em} .muted{color:#777;font-size:.9em} .ok{color:#1a7f37} .bad{color:#cf222e}
"""


def _img(path: Path, caption: str) -> str:
    if not path.is_file():
        return f'<p class="muted">({html.escape(caption)}: figure not available)</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _table(header: list[str], rows: list[list[Any]], digits: int = 3) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c, digits)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _latest(folder: Path, pattern: str) -> Path:
    files = sorted(folder.glob(pattern))
    return files[-1] if files else folder / "missing.png"


def training_curves(run: Path, out: Path) -> list[tuple[Path, str]]:
    """One PNG of logged metrics per trained stage (from Lightning's metrics.csv)."""
    from ldae.evaluation.plots import plot_training_curves

    figs = []
    for stage in STAGES:
        csv = stage_dir(run, stage) / "logs" / "metrics.csv"
        if csv.is_file():
            figs.append((plot_training_curves(out / f"curves_{stage}.png", csv, title=stage), f"{stage}: training curves"))
    return figs


def _probe_rows(probe: dict) -> list[list[Any]]:
    rows = []
    for name in FEATURE_SETS:
        if name in probe:
            ad, age = probe[name]["ad_vs_cn"], probe[name]["age"]
            rows.append([name, ad["auc"], _ci(ad.get("auc_ci95")), ad.get("cv_auc_best"), ad.get("threshold"),
                         ad.get("balanced_accuracy"), ad["accuracy"], ad["f1"], ad["mcc"], age["mae"],
                         _ci(age.get("mae_ci95"), 2), age.get("cv_mae_best")])
    return rows


def _band(b: list[int]) -> str:
    return f"[{b[0]}, {b[1]})"


def _diagnostics_parts(d: dict) -> list[str]:
    """The ``diagnostics`` block: DDPM memorisation per band, the gap G_ψ fills, the representation table."""
    parts = ["<h2>Diagnostics: what the latent DDPM leaves for y_sem</h2>"]
    parts.append(_table(["timestep band", "loss (train)", "loss (held-out)", "train / held-out"],
                        [[_band(b["band"]), b["train"], b["held_out"], b["ratio"]] for b in d.get("denoising_loss", [])], 4))
    parts.append(f'<p class="muted">‖ε − ε_θ(z_t, t)‖² (mean per latent element) on {d["n_train"]} training and '
                 f'{d["n_held_out"]} held-out (val + test) latents, the same (t, ε) draws for both (seed {d["seed"]}). '
                 "A ratio well below 1 means the DDPM has memorised its training latents: then the posterior mean "
                 "leaves little for y_sem to fill but the subject's identity.</p>")
    if d.get("gap"):
        parts.append(_table(["timestep band", "ε_θ alone", "with own y_sem", "with another's y_sem",
                             "removed (own)", "removed (other)", "own < other (scans)",
                             "removed (own, training scans)"],
                            [[_band(g["band"]), g["plain"], g["own"], g["other"], g["gap_own"], g["gap_other"],
                              g["own_beats_other"], g.get("gap_own_train")] for g in d["gap"]], 4))
        parts.append('<p class="muted">Held-out scans: ‖ε − (ε_θ − k_t G_ψ(z_t, y_sem, t))‖² with the scan\'s own y_sem '
                     "and with another subject's; \"removed\" = the fraction of ε_θ's error G_ψ takes away. The last "
                     "column is the same on training scans: positive there but negative held out = G_ψ memorises; "
                     "negative on both = G_ψ fits nothing (e.g. y_sem off the distribution it was trained on).</p>")
    rep = d.get("representation") or {}
    if rep:
        cols = list(next(iter(rep.values())))
        def header(c: str) -> str:
            if c.endswith("_cv_r2"):
                return c.removesuffix("_cv_r2") + " CV R²"
            return c.removesuffix("_r2") + " R²" if c.endswith("_r2") else c

        parts.append(_table(["features", *[header(c) for c in cols]],
                            [[name, *[row.get(c) for c in cols]] for name, row in rep.items()]))
        parts.append('<p class="muted">Same split for every row: ridge R² per ground-truth factor on the test split '
                     "and in the train split's nested subject-grouped CV (CV R²), AD-vs-CN logistic AUC on the test "
                     "split (ad_auc) and in train-split CV (ad_cv_auc). voxel_pca = PCA of the model-ready voxels "
                     "fitted on the train split. latent R² = share of the autoencoder latents' between-scan "
                     "variation a ridge from the features reproduces (multi-output; test split, and nested CV on "
                     "the train split): a learned y_sem far higher in CV than on test reproduces the scans its "
                     "encoder was trained on, not new ones.</p>")
    return parts


def _ci(interval: list[float] | None, digits: int = 3) -> str | None:
    """``[lo, hi]`` as text (None stays None: shown as a dash)."""
    return None if not interval else f"{interval[0]:.{digits}f}–{interval[1]:.{digits}f}"


def _recon_rows(recon: dict) -> list[list[Any]]:
    rows = []
    ae = recon.get("autoencoder")
    if ae:
        rows.append(["AutoencoderKL", "—", ae["ssim"], ae["mse"], ae["psnr"], ae["lpips"], ae["seconds_per_scan"]])
    names = {"lddim_encoded": "LDDIM encoded", "ldae_encoded": "LDAE encoded", "ldae_semantic": "LDAE semantic-only",
             "ldae_semantic_other": "… with another subject's y_sem (control)"}
    other_ae = recon.get("autoencoder_other")
    for key, label in names.items():
        for steps, m in recon.get(key, {}).items():
            rows.append([label, steps, m["ssim"], m["mse"], m["psnr"], m["lpips"], m["seconds_per_scan"]])
    if other_ae:
        rows.append(["AutoencoderKL of the other subject's scan (reference: own − other at most AE − this)", "—",
                     other_ae["ssim"], other_ae["mse"], other_ae["psnr"], other_ae["lpips"], other_ae["seconds_per_scan"]])
    return rows


def _interpolation_parts(interp: dict, comparison: dict) -> list[str]:
    """Per-method scores (overall and by time gap) and the paired comparisons of the missing-visit task."""
    if not interp:
        return []
    methods = comparison.get("methods") or {}
    gaps: list[str] = []
    for v in interp.values():
        gaps += [g for g in v.get("by_time_gap", {}) if g not in gaps]
    rows = [[k, methods.get(k, ""), v.get("ssim"), v.get("mse"), v.get("n_triplets"),
             *[v.get("by_time_gap", {}).get(g, {}).get("ssim") for g in gaps]] for k, v in interp.items()]
    parts = [_table(["method", "what", "SSIM", "MSE", "triplets", *[f"SSIM, gap {g} mo" for g in gaps]], rows, 4)]
    if comparison.get("reference"):
        parts.append(f'<p class="muted">every prediction scored against the {html.escape(comparison["reference"])}</p>')
    pairs = [p for p in comparison.get("pairs", []) if p["metric"] == "ssim"]
    if pairs:
        parts.append("<h3>Which beats which (SSIM, paired on the same triplets)</h3>")
        rows = [[p["method"], p["versus"], p["mean_difference"], _ci(p["ci95"], 4), p["winner"] or "no clear difference",
                 ", ".join(f"{g}: {b['winner'] or '='}" for g, b in p.get("by_time_gap", {}).items())] for p in pairs]
        parts.append(_table(["method", "versus", "mean ΔSSIM", "95% CI", "winner", "winner by time gap (months)"],
                            rows, 4))
        parts.append(f'<p class="muted">{html.escape(comparison.get("interval", ""))}</p>')
    return parts


def _manipulation_check_parts(checks: dict, alphas: list) -> list[str]:
    """The signed, sized direction checks of the manipulation (one row per arm and structure)."""
    rows = []
    for arm in ("cn_to_ad", "ad_to_cn"):
        for region, c in (checks.get(arm) or {}).items():
            rows.append([arm.replace("_to_", " → ").upper(), region, c["expected"],
                         c["change_pct"][-1] if c["change_pct"] else None, c["gap_pct"], c["fraction_of_gap_per_alpha"],
                         c["fraction_of_gap_at_max_alpha"], c.get("noise_se_pct"), c["scans_in_expected_direction"],
                         c["signed"], c["monotonic"], c["passed"], c["reason"] or None])
    if not rows:
        return []
    top = f"{max(alphas):g}" if alphas else "max"
    return [f"<h3>Direction checks (passed overall: {_fmt(checks.get('passed'))})</h3>",
            _table(["arm", "structure", "expected", f"Δ% at α={top}", "cohort gap %", "gap fraction / unit α",
                    f"gap fraction at α={top}", f"noise SE of Δ% at α={top}", "scans the right way", "right sign",
                    "monotonic", "passed", "why not"],
                   rows, 3),
            f'<p class="muted">gap = the cohort\'s own change from the source to the target group\'s mean volume '
            f"({html.escape(str(checks.get('gap_source', '')))}); a check passes when every α moves the structure the "
            f"expected way, the changes never turn back, α={top} covers at least "
            f"{_fmt(checks.get('min_gap_fraction'))} of the gap, and its change exceeds "
            f"{_fmt(checks.get('noise_multiple'))} standard errors of the volumetry's own noise (the spread of each "
            "image's volume over ANTs seeds; blank with one seed).</p>"]


def write_report(run: str | Path, out_html: str | Path, metrics: dict, cohort_summary: dict | None = None,
                 title: str = "LDAE run report") -> Path:
    """Write ``out_html`` for a run folder whose evaluation is done; ``metrics`` = the merged metrics."""
    run, out_html = Path(run), Path(out_html)
    ev = stage_dir(run, "evaluation")
    fig_dir = out_html.parent / "report_figures"
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="muted">run folder: {html.escape(str(run.resolve()))}</p>']
    probe = metrics.get("probe", {})
    learned = probe.get("learned", {})
    recon = metrics.get("reconstruction", {})
    kpis = []
    if learned:
        kpis.append(("AD vs CN ROC-AUC (learned y_sem)", learned["ad_vs_cn"]["auc"]))
        for ctrl in ("untrained", "oracle"):
            if ctrl in probe:
                kpis.append((f"… {ctrl} control", probe[ctrl]["ad_vs_cn"]["auc"]))
        kpis.append(("age MAE (years)", learned["age"]["mae"]))
    if recon.get("autoencoder"):
        kpis.append(("AutoencoderKL SSIM", recon["autoencoder"]["ssim"]))
        enc = recon.get("ldae_encoded", {})
        if enc:
            best = max(enc, key=lambda k: int(k))
            kpis.append((f"LDAE encoded SSIM ({best} steps)", enc[best]["ssim"]))
    parts.append('<div class="kpi">' + "".join(f"<div><b>{_fmt(v)}</b>{html.escape(k)}</div>" for k, v in kpis) + "</div>")
    if "aims" in metrics:
        parts.append("<h2>Aims of the demo</h2>")
        parts.append(_table(["aim", "value (test split)", "train-split CV", "95% CI", "met", "why not"],
                            [[a["aim"], a["value"], a.get("value_cv"), _ci(a.get("interval")), a["met"],
                              a.get("note")] for a in metrics["aims"]]))
        parts.append('<p class="muted">AUC aims are met only when the test split and the train-split CV both meet '
                     "them (the AUC over both controls against the stronger one of each estimate); factor-R² "
                     "aims compare the learned y_sem's test-split probe with a floor or with latent PCA's; "
                     "interpolation aims when the whole 95% interval (bootstrap over test subjects) of LDAE's "
                     "paired SSIM advantage lies above zero; manipulation aims when the structure moves the disease's "
                     "way at every α, never turns back, and the largest α covers the stated fraction of the cohort's "
                     "own AD−CN volume difference.</p>")

    parts.append("<h2>Cohort</h2>")
    if cohort_summary:
        c = cohort_summary
        rows = [["subjects / scans", f"{c.get('subjects')} / {c.get('scans')}"],
                ["diagnosis (scans)", ", ".join(f"{k} {v}" for k, v in c.get("diagnosis_scans", {}).items())],
                ["age", f"{c['age']['min']:.1f}–{c['age']['max']:.1f} (mean {c['age']['mean']:.1f})" if "age" in c else "—"],
                ["split (subjects)", ", ".join(f"{k} {v}" for k, v in c.get("split_subjects", {}).items())],
                ["session months", ", ".join(str(m) for m in c.get("session_months", []))]]
        if "ground_truth_auc" in c:
            rows.append(["ground-truth AD-vs-CN AUC (volumes + age, logistic CV)", _fmt(c["ground_truth_auc"])])
        parts.append(_table(["", ""], rows))

    parts.append("<h2>Training curves</h2>")
    for path, caption in training_curves(run, fig_dir):
        parts.append(_img(path, caption))

    parts.append("<h2>Reconstruction</h2>")
    parts.append(_table(["method", "DDIM steps", "SSIM", "MSE", "PSNR", "LPIPS", "s / scan"], _recon_rows(recon), 4))
    parts.append(f'<p class="muted">{html.escape(str(metrics.get("reconstruction_note", "")))}; LPIPS: '
                 f'{html.escape(str(metrics.get("lpips_status", "")))}; semantic-only decodings (random z_T) at guidance '
                 f'scale s = {_fmt(metrics.get("guidance_scale", 1.0))} (ε̂ = ε_θ − s·√(1−ᾱ_t)·G_ψ; 1 = the paper\'s), '
                 'decodings of an inverted z_T at s = 1</p>')
    parts.append(_img(_latest(stage_dir(run, "autoencoder") / "figures", "*.png"), "autoencoder: input / reconstruction / |error| (last validation)"))
    parts.append(_img(_latest(stage_dir(run, "representation") / "figures", "recon_epoch*.png"),
                      "LDAE: input, autoencoder, semantic-only, encoded reconstructions (last validation)"))
    parts.append("<h2>Stochastic variations</h2>")
    parts.append(_img(ev / "variations.png", "fixed y_sem, new z_T: the semantic vector keeps the anatomy"))
    parts.append("<h2>Interpolation and missing-timepoint prediction</h2>")
    parts.append(_img(ev / "interpolation_strip.png", "between two visits of one subject (LERP y_sem, SLERP z_T)"))
    parts += _interpolation_parts(metrics.get("interpolation", {}), metrics.get("interpolation_comparison") or {})
    parts.append(_img(ev / "interpolation.png", "predicted missing visit vs its input scan, by gap and position"))

    parts.append("<h2>Manipulation along the AD↔CN probe direction</h2>")
    man = metrics.get("manipulation", {})
    for name in ("cn_to_ad", "ad_to_cn"):
        block = man.get(name, {})
        if block.get("n_scans"):
            rows = [[a, block[a]["ventricle_change_pct"], block[a]["hippocampus_change_pct"]]
                    for a in block if isinstance(block[a], dict) and a != "image_change"]
            parts.append(f"<h3>{name.replace('_to_', ' → ').upper()} ({block['n_scans']} test scans)</h3>")
            parts.append(_table(["α", "ventricles Δ%", "hippocampus Δ%"], rows, 2))
            change = block.get("image_change") or {}
            if change:
                parts.append(f'<p class="muted">decoding at the largest α against the first: SSIM '
                             f'{_fmt(change.get("ssim_max_vs_first_alpha"), 4)}, mean |Δ intensity| '
                             f'{_fmt(change.get("mean_abs_difference"), 4)}</p>')
        parts.append(_img(ev / f"manipulation_{name}.png", f"{name}: strip over α with difference maps"))
    parts.append(_img(ev / "manipulation_volumes.png", "regional volume change vs α (atlas propagation)"))
    if man.get("checks"):
        parts += _manipulation_check_parts(man["checks"], man.get("alphas") or [])
    sep = man.get("separation") or {}
    if sep.get("train"):
        tr, te = sep["train"], sep.get("test") or {}
        top = f"{max(abs(a) for a in man['alphas']):g}" if man.get("alphas") else "max"
        parts.append(f'<p class="muted">along the direction (α units), AD − CN: {_fmt(tr["ad_minus_cn"])} on the train '
                     f'split (within-group SD {_fmt(tr.get("within_sd"))}), {_fmt(te.get("ad_minus_cn"))} on test; '
                     f'α={top} moves {_fmt(sep.get("alpha_max_over_separation"), 1)} times the train split\'s AD − CN '
                     "distance</p>")
    if man.get("volumetry_check"):
        vc = man["volumetry_check"]
        parts.append(f'<p class="muted">volumetry vs ground truth on {vc["n_scans"]} real test scans: '
                     f'ventricles r = {_fmt(vc.get("ventricle_pearson_r"))}, hippocampus r = {_fmt(vc.get("hippocampus_pearson_r"))}</p>')

    parts.append("<h2>Linear probes</h2>")
    parts.append(_table(["features", "AUC", "AUC 95% CI", "CV AUC", "P(AD) cut", "balanced acc.", "accuracy", "F1",
                         "MCC", "age MAE", "MAE 95% CI", "CV MAE"], _probe_rows(probe)))
    parts.append('<p class="muted">AD vs CN: positive class AD, MCI excluded; probes fitted on the train split with '
                 "subject-grouped cross-validation, reported on the test split. 95% CI: bootstrap over test subjects; "
                 "CV: the subject-grouped validation score on the train split at the chosen regularisation (a second, "
                 "independent estimate: trust neither alone on a small test split). Thresholded metrics: class-balanced "
                 "logistic fit, P(AD) cut chosen on the train split's out-of-fold scores (highest balanced accuracy). Oracle = true regional volumes + age "
                 "(volumes only for age). latent_pca = the first principal components of the autoencoder's latents (fitted "
                 "on the train split): what the compressed latent carries linearly at this resolution.</p>")
    factors = metrics.get("factors") or {}
    names = [c for c in (factors.get("learned") or {})]
    if names:
        parts.append("<h3>What y_sem encodes</h3>")
        parts.append(_table(["encoder", *[f"{c} ({where})" for c in names for where in ("test", "CV")]],
                            [[enc, *[factors[enc][c].get(key) for c in names for key in ("r2", "cv_r2")]]
                             for enc in FEATURE_SETS if enc in factors]))
        parts.append('<p class="muted">R² of a ridge probe per known factor: on the test split (fitted on the train '
                     "split, regularisation by subject-grouped CV) and, as a second estimate over more "
                     "subjects, in the train split's nested subject-grouped CV (pooled out-of-fold predictions, "
                     "regularisation chosen inside each outer fold); 0 = no better than the mean.</p>")
    parts.append(_img(ev / "lda.png", "LDA projection of y_sem by diagnosis"))
    base = metrics.get("baselines") or {}
    if any(base.values()):
        parts.append("<h3>Baselines</h3>")
        rows = []
        for name, b in base.items():
            if b:
                ad, age = b["probe"]["ad_vs_cn"], b["probe"]["age"]
                rows.append([name, ad["auc"], ad["accuracy"], ad["f1"], ad["mcc"], age["mae"], age["rmse"]])
        parts.append(_table(["baseline", "AUC", "accuracy", "F1", "MCC", "age MAE", "age RMSE"], rows))

    if metrics.get("diagnostics"):
        parts += _diagnostics_parts(metrics["diagnostics"])

    parts.append("<h2>Timings</h2>")
    parts.append(_table(["step", "seconds"], _timing_rows(metrics.get("timings_s", {})), 1))
    parts.append('<p class="muted">metrics.json holds every number shown here.</p>')
    doc = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    return write_text(out_html, doc)


def _timing_rows(timings: dict, prefix: str = "") -> list[list[Any]]:
    """``timings_s`` as table rows; nested sections (the demo's stages, the evaluation's sections) are
    flattened to ``section: step``."""
    rows: list[list[Any]] = []
    for key, value in timings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _timing_rows(value, f"{name}: ")
        elif value is not None:
            rows.append([name, float(value)])
    return rows


def load_metrics(run: str | Path) -> dict:
    """``RUN/evaluation/metrics.json``."""
    return json.loads((stage_dir(run, "evaluation") / "metrics.json").read_text())
