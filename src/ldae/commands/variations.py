"""``ldae variations``: stochastic variations of a scan (fixed y_sem, new z_T)."""

from __future__ import annotations

import argparse

from ldae.commands import _inference

HELP = "stochastic variations of scans: same semantics, new noise (NIfTI + PNG)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    _inference.add_common(p)
    p.add_argument("--n", type=int, default=4, help="variations per scan")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="s in eps = eps_theta - s*sqrt(1-abar_t)*G_psi when decoding from random z_T (default: the "
                        "run's decoding.guidance_scale; 1 = the paper's)")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ldae.viz import save_mosaic

    if args.n < 1:
        from ldae.errors import LDAEError

        raise LDAEError(f"--n must be at least 1 variation per scan, got {args.n}")
    model, items, _ = _inference.load(args)
    out = Path(args.out)
    for name, vol, affine in items:
        var = model.variations(vol, args.n, seed=args.seed)
        rows = [("input", vol[0])]
        for i in range(args.n):
            _inference.save_volume(out, f"{name}_var{i}", var[i, 0], affine)
            rows.append((f"variation {i}", var[i, 0]))
        rows.append(("|var0 - var1|" if args.n > 1 else "|var0 - input|",
                     (var[0, 0] - (var[1, 0] if args.n > 1 else vol[0])).abs()))
        save_mosaic(out / f"{name}_variations.png", rows, title=f"{name}: {args.n} variations")
        print(f"{name}: {args.n} variations -> {out}")
    return 0
