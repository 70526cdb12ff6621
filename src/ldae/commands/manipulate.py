"""``ldae manipulate``: move scans' y_sem along a direction (default: the AD-vs-CN probe's)."""

from __future__ import annotations

import argparse

from ldae.commands import _inference

HELP = "manipulate scans along a semantic direction (e.g. AD<->CN probe); NIfTI + strip PNG"


def add_arguments(p: argparse.ArgumentParser) -> None:
    _inference.add_common(p)
    p.add_argument("--direction", default=None,
                   help="probes file from `ldae evaluate` (default: RUN/evaluation/probes.json) or a .npy vector")
    p.add_argument("--alphas", type=float, nargs="+", default=[-2.0, -1.0, 0.0, 1.0, 2.0],
                   help="steps along the unit direction in normalised y_sem units (+ = towards AD)")


def _direction(args: argparse.Namespace):
    from pathlib import Path

    import numpy as np

    from ldae.errors import LDAEError

    path = Path(args.direction) if args.direction else Path(args.model) / "evaluation" / "probes.json"
    if not path.is_file():
        raise LDAEError(f"{path}: no direction file (run `ldae evaluate` first or pass --direction)")
    if path.suffix == ".npy":
        return np.load(path)
    from ldae.evaluation.probes import load_probes

    # the probe's standardised coefficients: the steepest AD direction in y_sem normalised by its
    # training mean/std, which is the space LDAE.manipulate moves in
    return np.asarray(load_probes(path)["ad_vs_cn"]["coef"])


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ldae.viz import save_strip

    direction = _direction(args)
    model, items, _ = _inference.load(args)
    out = Path(args.out)
    zero = min(range(len(args.alphas)), key=lambda i: abs(args.alphas[i]))
    for name, vol, affine in items:
        vols = model.manipulate(vol, direction, args.alphas)
        for a, v in zip(args.alphas, vols):
            _inference.save_volume(out, f"{name}_alpha{a:+.2f}", v[0], affine)
        save_strip(out / f"{name}_manipulation.png", [v[0] for v in vols], [f"α={a:+.1f}" for a in args.alphas],
                   diff_to=zero, title=f"{name}: along the direction (+ = towards AD)")
        print(f"{name}: {len(args.alphas)} manipulated volumes -> {out}")
    return 0
