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
    p.add_argument("--write-split", nargs="?", const="", default=None, metavar="OUT.csv",
                   help="write a copy of the CSV with the assigned split column (default COHORT.split.csv; the "
                        "input CSV is never rewritten; every other cell is copied verbatim)")
    p.add_argument("--ssim-pairs", type=int, default=50, metavar="N",
                   help="SSIM between consecutive visits of a subject, over the first N pairs (subjects in "
                        "sorted order; 0: skip, -1: all); ~4 s a pair at 128x160x128 on one core")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from ldae.data.cohort import default_split_path, ensure_split, read_cohort, summarize, write_split_copy
    from ldae.errors import CohortError

    if args.write_split is not None:  # checked before reading any volume
        split_out = Path(args.write_split) if args.write_split else default_split_path(args.csv)
        if split_out.resolve() == Path(args.csv).resolve():
            raise CohortError(f"{split_out}: --write-split never rewrites the cohort CSV in place; "
                              "choose another file")
        if split_out.is_dir():
            raise CohortError(f"{split_out}: is a folder; --write-split needs a CSV file name")
    df = read_cohort(args.csv, labels=args.labels)
    had_split = "split" in df.columns
    df = ensure_split(df, seed=args.seed)
    grids: dict[str, list[int]] = {}
    if not args.no_volumes:
        grids = _check_volumes(args.csv, df, disable=args.json)
    summary = summarize(df)
    summary["split_source"] = "csv" if had_split else f"assigned (seed {args.seed})"
    if grids:
        summary["volume_grids"] = {grid: _rows_text(rows) for grid, rows in grids.items()}
    if not args.no_volumes and args.ssim_pairs != 0:
        summary["consecutive_visit_ssim"] = _visit_ssim(df, args.ssim_pairs, disable=args.json)
    if args.write_split is not None and not had_split:
        written = write_split_copy(args.csv, list(df["split"]), split_out)
        summary["split_source"] += f", written to {written}"
        summary["split_csv"] = str(written)
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
    if grids:
        table.add_row("volume grids", "; ".join(f"{g} ({rows})" for g, rows in summary["volume_grids"].items()))
        if len(grids) > 1:
            table.add_row("", "mixed grids: each scan is resampled onto the model's grid by its affine")
    visits = summary.get("consecutive_visit_ssim")
    if visits and visits["pairs"]:
        of = f" of {visits['of_pairs']}" if "of_pairs" in visits else ""
        table.add_row("consecutive-visit SSIM", f"median {visits['median']:.4f} (range {visits['min']:.4f}–"
                      f"{visits['max']:.4f}; {visits['pairs']}{of} pairs)")
    console.print(table)
    console.print("[green]cohort OK[/green]")
    return 0


def _rows_text(rows: list[int]) -> str:
    """CSV line numbers (header = line 1) as compact ranges: ``rows 2-5, 9``."""
    lines = [r + 2 for r in rows]
    parts, start = [], lines[0]
    for prev, cur in zip(lines, lines[1:] + [None]):
        if cur != prev + 1:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ("row " if len(lines) == 1 else "rows ") + ", ".join(parts)


def _check_volumes(csv: str, df, disable: bool = False) -> dict[str, list[int]]:
    """Read every volume (3D, finite, not constant) and check that its affine and field of view let it be
    resampled onto the model's grid (:mod:`ldae.data.geometry`, the paper's grid: the whole MNI brain).

    Returns ``{grid description: row indices}``; a CohortError naming the CSV rows (and the reason per row)
    when any scan cannot be used, so a cohort of mixed grids passes only when all of them resample."""
    import numpy as np
    from rich.progress import track

    from ldae.data.cohort import _row
    from ldae.data.geometry import PAPER_GRID, ModelGrid, check_affine, check_coverage, header_geometry
    from ldae.data.transforms import read_volume
    from ldae.errors import CohortError

    grid = ModelGrid.of(*PAPER_GRID)
    grids: dict[str, list[int]] = {}
    failures: list[str] = []
    for i, path in enumerate(track(list(df["path"]), description="reading volumes", disable=disable,
                                   transient=True)):
        try:
            read_volume(path)  # voxel data first: its errors are the most specific
            shape, affine, codes = header_geometry(path)
            affine = check_affine(affine, str(path), codes)
            zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
            key = f"{'x'.join(f'{z:.3g}' for z in zooms)} mm {'x'.join(map(str, shape))}"
            check_coverage(affine, shape, grid, str(path))
        except CohortError as exc:
            failures.append(f"{_row(i)}: {exc}")
            continue
        grids.setdefault(key, []).append(i)
    if failures:
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        mixed = f" (cohort of {len(grids) + len(failures)} scans on {len(grids)} usable grid(s))" if grids else ""
        raise CohortError(f"{csv}: {len(failures)} scan(s) cannot be used{mixed}: " + "; ".join(failures[:3]) + more)
    return grids


def _visit_ssim(df, max_pairs: int, disable: bool = False) -> dict:
    """Median and range of the SSIM between consecutive visits (:mod:`ldae.evaluation.repeat_scans`):
    what separates a repeat scan from a copy, the floor an interpolation method has to beat."""
    from rich.progress import track

    from ldae.evaluation.repeat_scans import consecutive_pairs, consecutive_visit_ssim, summarize_ssim

    total = len(consecutive_pairs(df))
    pairs = consecutive_visit_ssim(
        df, None if max_pairs < 0 else max_pairs,
        progress=lambda items: track(items, description="consecutive-visit SSIM", disable=disable,
                                     transient=True),
    )
    return summarize_ssim(pairs, total_pairs=total)
