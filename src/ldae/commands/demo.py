"""``ldae demo``: the main job that ``make demo`` runs.

Until the full pipeline lands this runs the data layer end to end on a small generated cohort:
write volumes, validate the cohort, split by subject, and load model-ready batches.
"""

from __future__ import annotations

import argparse

HELP = "run the whole method on the bundled cohort and write a report (placeholder: data layer)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ldae.data.cohort import summarize
    from ldae.data.datamodule import VolumeDataModule
    from ldae.data.phantom import write_phantom_cohort
    from ldae.io import write_json

    out = Path(args.out)
    csv = write_phantom_cohort(out / "cohort", n_subjects=9, seed=args.seed)
    dm = VolumeDataModule(csv, spacing=6.0, shape=(32, 40, 32), batch_size=2, seed=args.seed,
                          test_fraction=0.2, val_fraction=0.15)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    image = batch["image"]
    summary = summarize(dm.load_cohort())
    summary["batch_shape"] = list(image.shape)
    summary["batch_range"] = [float(image.min()), float(image.max())]
    write_json(out / "metrics.json", {"cohort": summary})
    print(f"demo (data layer): {summary['subjects']} subjects, {summary['scans']} scans, "
          f"split {summary['split_subjects']}, batch {tuple(image.shape)} in "
          f"[{summary['batch_range'][0]:.2f}, {summary['batch_range'][1]:.2f}] -> {out / 'metrics.json'}")
    return 0
