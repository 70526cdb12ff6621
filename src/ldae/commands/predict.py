"""``ldae predict``: P(AD) and estimated age per scan from the probes saved by ``ldae evaluate``."""

from __future__ import annotations

import argparse

HELP = "P(AD) and estimated age per scan (needs the probes saved by `ldae evaluate`)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ldae.jobs.predict import DEFAULT_FOV_TOLERANCE

    p.add_argument("--model", required=True, help="LDAE run folder (its evaluation/probes.json is used)")
    p.add_argument("scans", nargs="+", help="model-ready NIfTI scan(s), or raw T1s with --preprocess")
    p.add_argument("--probes", default=None, help="probes JSON (default: RUN/evaluation/probes.json)")
    p.add_argument("--preprocess", action="store_true",
                   help="run the raw-T1 pipeline (`ldae preprocess`, needs ANTsPy) first, in a temporary folder")
    p.add_argument("--preprocess-config", default=None, metavar="YAML", help="preprocessing settings for --preprocess")
    p.add_argument("--json", action="store_true", help="print JSON on stdout instead of a table")
    p.add_argument("--csv", default=None, metavar="OUT", help="also write the predictions as CSV")
    p.add_argument("--save-embeddings", default=None, metavar="OUT.npz", help="also write y_sem per scan (NPZ)")
    p.add_argument("--batch-size", type=int, default=4, help="scans per encoder pass")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--fov-tolerance", type=float, default=DEFAULT_FOV_TOLERANCE,
                   help="inf: skip the header-only geometry check before loading the model (scans are "
                        "still resampled onto the model's grid by their affine and must cover the brain)")


def _print_table(result) -> None:
    from rich.console import Console
    from rich.table import Table

    m = result.probe_metrics
    caption = []
    if "auc" in m.get("ad_vs_cn", {}):
        caption.append(f"AD-vs-CN probe: test AUC {m['ad_vs_cn']['auc']:.3f} (n={m['ad_vs_cn'].get('n_test', '?')})")
    if "mae" in m.get("age", {}):
        caption.append(f"age probe: test MAE {m['age']['mae']:.2f} y")
    table = Table(title=f"ldae predict ({len(result.scans)} scan(s))", caption="; ".join(caption) or None)
    for name, justify in (("scan", "left"), (f"P({result.positive})", "right"), ("label", "left"),
                          ("age (y)", "right")):
        table.add_column(name, justify=justify)
    for r in result.records():
        table.add_row(r["name"], f"{r['p_ad']:.3f}", r["label"], f"{r['age']:.1f}")
    Console().print(table)


def main(args: argparse.Namespace) -> int:
    import json

    from ldae.distributed import resolve_device
    from ldae.io import write_csv
    from ldae.jobs.predict import predict

    for option, value in (("--csv", args.csv), ("--save-embeddings", args.save_embeddings)):
        _check_output_file(option, value)  # before any computation
    result = predict(args.model, args.scans, probes=args.probes, batch_size=args.batch_size,
                     preprocess=args.preprocess, preprocess_config=args.preprocess_config,
                     fov_tolerance=args.fov_tolerance, device=resolve_device(args.device))
    if args.csv:
        write_csv(args.csv, result.table())
    if args.save_embeddings:
        result.save_embeddings(args.save_embeddings)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        _print_table(result)
        for what, path in (("CSV", args.csv), ("embeddings", args.save_embeddings)):
            if path:
                print(f"{what} -> {path}")
    return 0


def _check_output_file(option: str, value: str | None) -> None:
    """LDAEError unless ``value`` (an output file) can be written: not a folder, its folder writable."""
    import os
    from pathlib import Path

    from ldae.errors import LDAEError

    if not value:
        return
    path = Path(value)
    if path.is_dir():
        raise LDAEError(f"{path}: {option} is a folder; it needs a file name")
    parent = path.parent
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise LDAEError(f"{path}: {option} cannot be written ({parent} is not a writable folder)")
