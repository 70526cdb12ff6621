"""``ldae evaluate``: reconstruction table, linear probes, missing-timepoint prediction, manipulation,
baselines — one command, any cohort."""

from __future__ import annotations

import argparse

HELP = "evaluate a trained run: recon table, probes, interpolation, manipulation, baselines"
ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="LDAE run folder")
    p.add_argument("--csv", default=None,
                   help="cohort CSV (default: RUN/latents/cohort_with_compressed_latent.csv)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/evaluation)")
    from ldae.config import PRESETS

    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="evaluation preset (default: the run's preset)")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="DDIM step counts of the recon table")
    p.epilog = "Other --section.key VALUE pairs override the evaluation config, e.g. --manipulation.max_scans 2"


def main(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ldae.config import load_preset
    from ldae.evaluation.evaluate import evaluate
    from ldae.runs import COMPRESSED_CSV, stage_dir

    run_dir = Path(args.model)
    csv = Path(args.csv) if args.csv else stage_dir(run_dir, "latents") / COMPRESSED_CSV
    out = Path(args.out) if args.out else stage_dir(run_dir, "evaluation")
    cfg = load_preset(args.preset, "evaluation") if args.preset else None
    overrides = list(args.overrides)
    if args.steps:
        overrides += ["--reconstruction.steps", json.dumps(args.steps)]
    path = evaluate(run_dir, csv, out, cfg=cfg, overrides=overrides)
    m = json.loads(path.read_text())
    learned = m["probe"]["learned"]
    ci = learned["ad_vs_cn"].get("auc_ci95")
    print(f"AD vs CN AUC {learned['ad_vs_cn']['auc']:.3f}" + (f" [95% CI {ci[0]:.2f}-{ci[1]:.2f}]" if ci else "")
          + f" (untrained {m['probe']['untrained']['ad_vs_cn']['auc']:.3f}"
          + "".join(f", {name.replace('_', ' ')} {m['probe'][name]['ad_vs_cn']['auc']:.3f}"
                    for name in ("latent_pca", "oracle") if name in m["probe"])
          + f"); age MAE {learned['age']['mae']:.2f} y; AE SSIM {m['reconstruction']['autoencoder']['ssim']:.3f}")
    interp = {k: v["ssim"] for k, v in m.get("interpolation", {}).items() if v.get("ssim") is not None}
    if interp:
        print("missing-visit SSIM: " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in interp.items()))
    checks = (m.get("manipulation") or {}).get("checks")
    if checks:
        print(f"manipulation direction checks: {'passed' if checks['passed'] else 'NOT passed'}")
    print(f"metrics -> {path}")
    return 0
