"""``ldae check COHORT.csv``: validate a cohort (schema, files, volumes) and print a summary."""

from __future__ import annotations

import argparse
import json

HELP = "validate a cohort CSV (schema, files, volumes) and print a summary"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("csv", help="cohort CSV (subject, session, path, diagnosis, age[, latent_path, split])")
    p.add_argument("--labels", nargs="+", default=["CN", "MCI", "AD"], help="allowed diagnosis labels")
    p.add_argument("--no-volumes", action="store_true", help="check schema and files only, not voxel data")
    p.add_argument("--seed", type=int, default=0, help="seed of the split shown when the CSV has none")
    p.add_argument("--write-split", action="store_true", help="write the (possibly new) split column back")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    from ldae.data.cohort import ensure_split, read_cohort, summarize, write_cohort
    from ldae.data.transforms import read_volume

    df = read_cohort(args.csv, labels=args.labels)
    had_split = "split" in df.columns
    df = ensure_split(df, seed=args.seed)
    shapes: set[tuple[int, ...]] = set()
    if not args.no_volumes:
        for path in track(df["path"], description="reading volumes", disable=args.json, transient=True):
            data, _ = read_volume(path)
            shapes.add(tuple(data.shape))
    summary = summarize(df)
    summary["split_source"] = "csv" if had_split else f"assigned (seed {args.seed})"
    if shapes:
        summary["volume_shapes"] = sorted(list(s) for s in shapes)
    if args.write_split and not had_split:
        write_cohort(df, args.csv)
        summary["split_source"] += ", written to CSV"
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    console = Console()
    table = Table(title=f"cohort {args.csv}", show_header=False)
    table.add_row("subjects / scans", f"{summary['subjects']} / {summary['scans']}")
    sps = summary["sessions_per_subject"]
    table.add_row("sessions per subject", f"{sps['min']}–{sps['max']} (mean {sps['mean']:.2f})")
    table.add_row("session months", ", ".join(str(m) for m in summary["session_months"]))
    table.add_row("diagnosis (scans)", ", ".join(f"{k} {v}" for k, v in summary["diagnosis_scans"].items()))
    table.add_row(
        "diagnosis (subjects, baseline)",
        ", ".join(f"{k} {v}" for k, v in summary["diagnosis_subjects_baseline"].items()),
    )
    age = summary["age"]
    table.add_row("age", f"{age['min']:.1f}–{age['max']:.1f} (mean {age['mean']:.1f} ± {age['std']:.1f})")
    table.add_row(
        "split (subjects)",
        ", ".join(f"{k} {v}" for k, v in summary["split_subjects"].items()) + f"  [{summary['split_source']}]",
    )
    if shapes:
        table.add_row("volume shapes", "; ".join("×".join(map(str, s)) for s in summary["volume_shapes"]))
    console.print(table)
    console.print("[green]cohort OK[/green]")
    return 0
