"""``ldae synth``: write the bundled realistic longitudinal cohort (NIfTI volumes + cohort.csv)."""

from __future__ import annotations

import argparse

HELP = "generate the bundled realistic longitudinal cohort (templates + atlas, known ground truth)"
ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="cohort folder (images/, cohort.csv, synth.json)")
    p.add_argument("--subjects", type=int, default=None, help="number of subjects (config: cohort.subjects)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (same seed -> identical files)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                   help="output volume shape (default 128 160 128)")
    p.add_argument("--spacing", type=float, default=None, help="output voxel size in mm (default 1.5)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: available CPUs)")
    p.add_argument("--config", default=None, help="YAML overriding the packaged generator defaults")
    p.add_argument("--no-images", action="store_true",
                   help="ground truth only: write DIR/truth.csv without rendering images (fast)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.epilog = ("Any other --section.key VALUE overrides one generator setting, e.g. "
                "--cohort.visits '[2, 3]' or --intensity.noise gaussian (see ldae/configs/synth.yaml)")


def main(args: argparse.Namespace) -> int:
    import math

    from ldae.data.synthetic import load_synth_config, synthesize

    cfg = load_synth_config(args.config, args.overrides)
    result = synthesize(
        args.out, n_subjects=args.subjects, seed=args.seed, shape=args.shape, spacing=args.spacing,
        workers=args.workers, cfg=cfg, images=not args.no_images, progress=not args.quiet,
    )
    s = result.summary
    effects = result.effects
    print(f"synth: {s['subjects']} subjects, {result.volumes} volumes -> {result.csv}")
    if not args.no_images:
        print(f"  images: {result.written} written, {result.skipped} already complete; "
              f"{'x'.join(map(str, s['shape']))} at {s['spacing']:g} mm")
    print(f"  time: {result.seconds:.1f} s wall, {result.seconds_per_volume:.2f} s/volume "
          f"({result.compute_seconds / max(result.volumes, 1):.2f} s/volume per worker)")
    if "hippocampus_ad_vs_cn_pct" in effects:
        print(f"  baseline AD vs CN: hippocampus {effects['hippocampus_ad_vs_cn_pct']:+.1f}%, ventricles "
              f"{effects['ventricle_ad_vs_cn_pct']:+.1f}%, brain {effects['brain_ad_vs_cn_pct']:+.1f}%")
    auc = "n/a (too few AD or CN subjects)" if math.isnan(result.auc) else f"{result.auc:.3f}"
    print(f"  ground-truth AD-vs-CN ROC-AUC (logistic regression on hippocampus, ventricle, brain volume, "
          f"age; 5-fold CV): {auc}")
    return 0
