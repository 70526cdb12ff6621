"""``ldae demo``: what ``make demo`` runs — the bundled cohort through the whole method, with a report."""

from __future__ import annotations

import argparse

HELP = "run the whole method on the bundled cohort (tiny preset) and write report.html + metrics.json"
ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (rerun to resume)")
    p.add_argument("--seed", type=int, default=None, help="cohort and training seed (default 0)")
    p.add_argument("--subjects", type=int, default=None, help="cohort size (default: configs/demo.yaml)")
    p.epilog = "Pipeline overrides pass through, e.g. --representation.trainer.max_epochs 10"


def main(args: argparse.Namespace) -> int:
    import json

    from ldae.jobs.demo import run_demo

    report = run_demo(args.out, seed=args.seed, subjects=args.subjects, overrides=list(args.overrides))
    metrics = json.loads((report.parent / "metrics.json").read_text())
    for aim in metrics.get("aims", []):
        cv = f" (train-split CV: {aim['value_cv']:.3f})" if aim.get("value_cv") is not None else ""
        value = "n/a" if aim.get("value") is None else f"{aim['value']:.3f}"
        ci = f" [95% CI {aim['interval'][0]:.3f}, {aim['interval'][1]:.3f}]" if aim.get("interval") else ""
        print(f"[{'met' if aim['met'] else 'NOT met'}] {aim['aim']}: {value}{ci}{cv}")
    print(f"total {metrics['timings_s']['total'] / 60:.1f} min; report: {report}")
    return 0
