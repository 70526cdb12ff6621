"""``ldae encode``: semantic vectors y_sem and DDIM-inverted noise z_T of scans, saved to one NPZ."""

from __future__ import annotations

import argparse

from ldae.commands import _inference

HELP = "encode scans to (y_sem, z_T) with a trained LDAE and save them as NPZ"


def add_arguments(p: argparse.ArgumentParser) -> None:
    _inference.add_common(p)
    p.add_argument("--semantic-only", action="store_true", help="only y_sem (no DDIM inversion: fast)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from ldae.io import write_npz

    model, items = _inference.load(args)
    ys, zs = [], []
    for _, vol, _ in items:
        if args.semantic_only:
            ys.append(model.semantic(vol).cpu().numpy())
        else:
            y, z = model.encode(vol)
            ys.append(y.cpu().numpy())
            zs.append(z.cpu().numpy())
    out = Path(args.out)
    arrays = {"y_sem": np.concatenate(ys), "names": np.array([name for name, _, _ in items])}
    if zs:
        arrays["z_T"] = np.concatenate(zs)
    path = write_npz(out / "encodings.npz", **arrays)
    print(f"{len(items)} scan(s) encoded -> {path} (y_sem {arrays['y_sem'].shape}"
          + (f", z_T {arrays['z_T'].shape})" if zs else ")"))
    return 0
