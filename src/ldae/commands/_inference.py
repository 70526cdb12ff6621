"""Shared plumbing of the inference subcommands (encode, reconstruct, variations, interpolate,
manipulate): common arguments, model loading, reading scans, writing NIfTI + PNG outputs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np


def add_common(p: argparse.ArgumentParser, scans: str = "+") -> None:
    p.add_argument("--model", required=True, help="LDAE run folder (or a representation checkpoint)")
    p.add_argument("scans", nargs=scans, help="model-ready NIfTI scan(s) (see `ldae preprocess` for raw T1)")
    p.add_argument("--out", default="ldae_out", help="output folder")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the run's validation setting)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")


def device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load(args: argparse.Namespace):
    """``(model, [(name, volume (1,1,D,H,W), affine)])`` for the command's scans."""
    from ldae.model import LDAE

    model = LDAE.load(args.model, device=device(args.device), steps=args.steps)
    items = []
    for scan in args.scans:
        vol, affine = model.load_volume(scan)
        items.append((scan_name(scan), vol, affine))
    return model, items


def scan_name(path: str | Path) -> str:
    """File name without ``.nii(.gz)``."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def save_volume(out: Path, name: str, volume: Any, affine: np.ndarray) -> Path:
    """Write one ``(1, D, H, W)`` or ``(D, H, W)`` tensor as float32 NIfTI."""
    from ldae.io import write_nifti

    arr = volume.detach().float().cpu().numpy() if hasattr(volume, "detach") else np.asarray(volume)
    while arr.ndim > 3:
        arr = arr[0]
    return write_nifti(out / f"{name}.nii.gz", arr, affine)
