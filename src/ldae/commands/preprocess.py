"""``ldae preprocess INPUT... -o OUT``: raw T1 scans (files, folders, BIDS roots) -> model-ready NIfTI.

N4, brain extraction by template registration, affine to MNI ICBM 2009c, 1.5 mm 128×160×128, [0, 1];
a QC PNG and JSON per scan. Parallel, resumable; failures are listed at the end (exit 1).
"""

from __future__ import annotations

import argparse

HELP = "raw T1 -> model-ready NIfTI (N4, brain extraction, affine to MNI 2009c, 1.5 mm) with QC"
ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="NIfTI file(s), folder(s) of NIfTI files, or BIDS root(s) (sub-*/[ses-*/]anat/*_T1w.nii.gz)")
    p.add_argument("-o", "--out", required=True,
                   help="output folder (one <input name>.nii.gz per scan), or a .nii.gz path for a single input")
    p.add_argument("--csv", help="write / append a cohort CSV (BIDS inputs with known diagnosis and age)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--config", help="YAML with settings to change (may `_inherit: preprocess.yaml`)")
    p.add_argument("--overwrite", action="store_true", help="redo scans that are already finished")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    p.epilog = ("Any other --section.key VALUE overrides one setting, e.g. --brain_extraction.syn false "
                "(defaults: ldae/configs/preprocess.yaml). Needs ANTsPy: pip install 'ldae[preprocess]'.")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ldae.config import dump_config
    from ldae.errors import ConfigError
    from ldae.jobs import preprocess as pp

    cfg = pp.load_preprocess_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    pp.require_ants()
    scans = pp.discover_inputs(args.inputs)
    outputs = pp.plan_outputs(scans, args.out)
    console = Console(stderr=True, soft_wrap=True)  # one unbroken line per message (greppable logs)
    console.print(f"preprocessing {len(scans)} scan(s) -> {args.out} with {args.workers} worker(s)")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("preprocess", total=len(scans))

        def advance(result: pp.ScanResult) -> None:
            if result.status == "failed":
                progress.console.print(f"[red]failed[/red] {result.input.name}: {result.error}")
            for warning in result.warnings:
                if result.status == "done":
                    progress.console.print(f"[yellow]QC warning[/yellow] {result.input.name}: {warning}")
            progress.advance(task)

        results = pp.run_batch(scans, outputs, cfg, workers=args.workers, overwrite=args.overwrite,
                               on_result=advance)

    done = [r for r in results if r.status == "done"]
    skipped = [r for r in results if r.status == "skipped"]
    failed = [r for r in results if r.status == "failed"]
    flagged = [r for r in results if r.warnings and r.status != "failed"]
    mean = sum(r.seconds for r in done) / len(done) if done else 0.0
    console.print(f"done {len(done)} (mean {mean:.1f} s/scan), skipped {len(skipped)} (finished before), "
                  f"failed {len(failed)}, QC warnings {len(flagged)}")
    for r in flagged:
        console.print(f"  QC warning {r.output}: {'; '.join(r.warnings)}")

    if args.csv:
        ok = {r.output for r in results if r.status != "failed"}
        pairs = [(s, o) for s, o in zip(scans, outputs) if o in ok]
        rows, left_out = pp.cohort_rows([s for s, _ in pairs], [o for _, o in pairs])
        if rows:
            pp.append_cohort_csv(args.csv, rows)
        console.print(f"cohort CSV {args.csv}: {len(rows)} row(s) written, {len(left_out)} scan(s) left out")
        for reason in left_out:
            console.print(f"  left out {reason}")

    if failed:
        console.print(f"[red]{len(failed)} scan(s) failed:[/red]")
        for r in failed:
            console.print(f"  {r.input}: {r.error}")
        return 1
    return 0
