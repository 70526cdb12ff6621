"""``ldae interpolate``: volumes between two scans (LERP of y_sem, SLERP of z_T)."""

from __future__ import annotations

import argparse

from ldae.commands import _inference

HELP = "interpolate between two scans (LERP semantic vector, SLERP noise); NIfTI + strip PNG"


def add_arguments(p: argparse.ArgumentParser) -> None:
    _inference.add_common(p, scans=2)
    p.add_argument("--ts", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="interpolation positions (0 = first scan, 1 = second)")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ldae.viz import save_strip

    ts = _inference.finite_values(args.ts, "--ts")
    tags = _inference.value_tags(ts)
    model, items, _ = _inference.load(args)
    (n1, x1, affine), (n2, x2, _) = list(items)
    vols = model.interpolate(x1, x2, ts)
    out = Path(args.out)
    for tag, v in zip(tags, vols):
        _inference.save_volume(out, f"{n1}_to_{n2}_t{tag}", v[0], affine)
    save_strip(out / f"{n1}_to_{n2}_interpolation.png", [x1[0], *[v[0] for v in vols], x2[0]],
               ["scan 1", *[f"t={t:g}" for t in ts], "scan 2"], diff_to=1,
               title=f"{n1} -> {n2}")
    print(f"{len(ts)} interpolated volumes -> {out}")
    return 0
