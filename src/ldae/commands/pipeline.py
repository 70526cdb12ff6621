"""``ldae pipeline``: stage 1 -> compress -> stage 2 -> stage 3 -> evaluation, resumable."""

from __future__ import annotations

import argparse

HELP = "run all stages on a cohort (skips finished stages, resumes an interrupted one)"
ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ldae.config import PRESETS

    p.add_argument("--preset", choices=PRESETS, default="tiny")
    p.add_argument("--csv", required=True, help="cohort CSV")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--steps", nargs="+", default=None,
                   help="steps to run (default: autoencoder compress diffusion representation evaluation; "
                        "add voxel_dae supervised for the baselines)")
    p.add_argument("--restart", action="store_true",
                   help="start over: delete this run folder's stage outputs first (needed when the CSV, preset or "
                        "overrides differ from those the run was made from, see RUN/inputs.json)")
    p.epilog = ("Overrides are prefixed by the step: --autoencoder.trainer.max_epochs 3, "
                "--representation.optim.lr 1e-4, --compress.batch_size 4")


def main(args: argparse.Namespace) -> int:
    from ldae.io import write_json
    from ldae.jobs.pipeline import DEFAULT_STEPS, run_pipeline

    skipped: set[str] = set()

    def on_step(step: str, state: str) -> None:
        if state.startswith("already done"):
            skipped.add(step)

    timings = run_pipeline(args.preset, args.csv, args.out, overrides=args.overrides,
                           steps=args.steps or DEFAULT_STEPS, on_step=on_step, restart=args.restart)
    write_json(f"{args.out}/timings.json", timings)  # a skipped step keeps the seconds it took when it ran
    print("pipeline finished: " + ", ".join(
        f"{k} {v:.0f} s" + (" (done before)" if k in skipped else "") for k, v in timings.items()))
    return 0
