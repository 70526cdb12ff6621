"""Shared plumbing of the inference subcommands (encode, reconstruct, variations, interpolate,
manipulate): common arguments, model loading, reading scans, writing NIfTI + PNG outputs."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ldae.io import check_output_folder, nifti_stem


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
    p.add_argument("--sampler", choices=("ldae", "official"), default="ldae",
                   help="DDIM: ldae's (default; reaches t=T-1 and the clean level, no clamp) or the published "
                        "LDAE code's 'ddimN' (its timesteps, predicted latents clamped to [-1, 1]), to compare "
                        "results one to one with it")
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
    from ldae.data.geometry import header_geometry
    from ldae.data.transforms import check_model_ready
    from ldae.distributed import launch
    from ldae.errors import LDAEError
    from ldae.model import LDAE

    if args.steps is not None and args.steps < 1:
        raise LDAEError(f"--steps must be a positive number of DDIM steps, got {args.steps}")
    scale = getattr(args, "guidance_scale", None)
    if scale is not None:
        from ldae.diffusion.pdae import check_guidance_scale

        check_guidance_scale(scale, "--guidance-scale")
    check_output_folder(args.out)  # before any computation; nothing is created
    scans = scan_list(args)
    for _, path in scans:  # exists, not a folder, a readable 3D NIfTI: before the (slow) model load
        header_geometry(path)
    workers = launch(args.device, getattr(args, "devices", 1), getattr(args, "num_nodes", 1))
    model = workers.together(LDAE.load, args.model, device=workers.device, steps=args.steps,
                             sampler=getattr(args, "sampler", "ldae"), guidance_scale=scale)
    T = int(model.schedule.T)
    if args.steps is not None and args.steps > T:
        raise LDAEError(f"--steps must be between 1 and {T} (the run's diffusion timesteps), got {args.steps}")
    # every scan's affine and field of view against the model's grid, before any computation
    check_model_ready([path for _, path in scans], model.spacing, model.shape)

    def items() -> Iterator[tuple[str, Any, np.ndarray]]:
        for name, path in workers.shard(scans):
            vol, affine = model.load_volume(path)
            yield name, vol, affine

    return model, items(), workers


def finite_values(values: Sequence[float], option: str) -> list[float]:
    """``values`` as floats; LDAEError naming ``option`` for NaN/inf or a value given twice."""
    import math

    from ldae.errors import LDAEError

    values = [float(v) for v in values]
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise LDAEError(f"{option} must be finite numbers, got {bad[0]}")
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise LDAEError(f"{option} lists {dup[0]:g} more than once")
    return values


def value_tags(values: Sequence[float], signed: bool = False, min_decimals: int = 2) -> list[str]:
    """Distinct file-name tags for distinct numbers: the fewest decimals (at least ``min_decimals``) at
    which no two values print alike (``1`` and ``1.001`` -> ``1.000``, ``1.001``); LDAEError when even 8
    decimals cannot tell two apart."""
    from ldae.errors import LDAEError

    sign = "+" if signed else ""
    for decimals in range(min_decimals, 9):
        tags = [f"{float(v):{sign}.{decimals}f}" for v in values]
        if len(set(tags)) == len(tags):
            return tags
    raise LDAEError(f"values {', '.join(map(str, values))} are too close to name their outputs apart")


def save_volume(out: Path, name: str, volume: Any, affine: np.ndarray) -> Path:
    """Write one ``(1, D, H, W)`` or ``(D, H, W)`` tensor as float32 NIfTI."""
    from ldae.io import write_nifti

    arr = volume.detach().float().cpu().numpy() if hasattr(volume, "detach") else np.asarray(volume)
    while arr.ndim > 3:
        arr = arr[0]
    return write_nifti(out / f"{name}.nii.gz", arr, affine)
