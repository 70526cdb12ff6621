"""Shared plumbing of the inference subcommands (encode, reconstruct, variations, interpolate,
manipulate): common arguments, model loading, reading scans, writing NIfTI + PNG outputs."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ldae.io import nifti_stem


def add_common(p: argparse.ArgumentParser, scans: str = "+") -> None:
    """``scans="+"``: any number of scans, also from ``--csv``, shared out over ``--devices`` processes;
    otherwise exactly ``scans`` positional scans in one process."""
    from ldae.commands._args import add_parallel_arguments

    p.add_argument("--model", required=True, help="LDAE run folder (or a representation checkpoint)")
    batch = scans == "+"
    p.add_argument("scans", nargs="*" if batch else scans,
                   help="model-ready NIfTI scan(s) (see `ldae preprocess` for raw T1)")
    if batch:
        p.add_argument("--csv", help="cohort CSV whose 'path' column lists (more) scans; outputs are named "
                                     "<subject>_M<session>")
    p.add_argument("--out", default="ldae_out", help="output folder")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the run's validation setting)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    if batch:
        add_parallel_arguments(p)


def scan_list(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(output name, path)`` of every scan the command was given (positional, then ``--csv`` rows);
    LDAEError when there are none or two would write the same outputs."""
    from ldae.errors import LDAEError

    items = [(nifti_stem(s), str(s)) for s in args.scans]
    if getattr(args, "csv", None):
        from ldae.data.cohort import read_cohort

        df = read_cohort(args.csv, required=("subject", "session", "path"))
        items += [(f"{s}_M{int(m):03d}", str(p)) for s, m, p in zip(df["subject"], df["session"], df["path"])]
    if not items:
        raise LDAEError("no scans given: pass NIfTI paths and/or --csv COHORT")
    seen: dict[str, str] = {}
    for name, path in items:
        if name in seen and Path(seen[name]).resolve() != Path(path).resolve():
            raise LDAEError(f"{seen[name]} and {path} would both write outputs named '{name}': rename one")
        seen[name] = path
    return list(seen.items())  # a scan given twice is processed once


def load(args: argparse.Namespace):
    """``(model, items, workers)``: the model on this process's device and a lazy iterator of
    ``(name, volume (1,1,D,H,W), affine)`` over this process's share of the scans."""
    from ldae.distributed import launch
    from ldae.model import LDAE

    scans = scan_list(args)
    workers = launch(args.device, getattr(args, "devices", 1), getattr(args, "num_nodes", 1))
    model = workers.together(LDAE.load, args.model, device=workers.device, steps=args.steps)

    def items() -> Iterator[tuple[str, Any, np.ndarray]]:
        for name, path in workers.shard(scans):
            vol, affine = model.load_volume(path)
            yield name, vol, affine

    return model, items(), workers


def save_volume(out: Path, name: str, volume: Any, affine: np.ndarray) -> Path:
    """Write one ``(1, D, H, W)`` or ``(D, H, W)`` tensor as float32 NIfTI."""
    from ldae.io import write_nifti

    arr = volume.detach().float().cpu().numpy() if hasattr(volume, "detach") else np.asarray(volume)
    while arr.ndim > 3:
        arr = arr[0]
    return write_nifti(out / f"{name}.nii.gz", arr, affine)
