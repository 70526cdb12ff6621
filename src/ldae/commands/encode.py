"""``ldae encode``: semantic vectors y_sem and DDIM-inverted noise z_T of scans, saved to one NPZ."""

from __future__ import annotations

import argparse

from ldae.commands import _inference

HELP = "encode scans to (y_sem, z_T) with a trained LDAE and save them as NPZ"


def add_arguments(p: argparse.ArgumentParser) -> None:
    _inference.add_common(p)  # (--csv, --devices: batch inference over processes)
    p.add_argument("--semantic-only", action="store_true", help="only y_sem (no DDIM inversion: fast)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from ldae.io import write_npz

    model, items, workers = _inference.load(args)

    def encode_mine() -> list[tuple[str, np.ndarray, np.ndarray | None]]:
        done = []
        for name, vol, _ in items:
            if args.semantic_only:
                done.append((name, model.semantic(vol).cpu().numpy()[0], None))
            else:
                y, z = model.encode(vol)
                done.append((name, y.cpu().numpy()[0], z.cpu().numpy()[0]))
        return done

    parts = workers.gather(workers.together(encode_mine))
    if not workers.is_main:
        return 0
    by_name = {name: (y, z) for part in parts for name, y, z in part}
    names = [name for name, _ in _inference.scan_list(args)]
    arrays = {"y_sem": np.stack([by_name[n][0] for n in names]), "names": np.array(names)}
    if not args.semantic_only:
        arrays["z_T"] = np.stack([by_name[n][1] for n in names])
    path = write_npz(Path(args.out) / "encodings.npz", **arrays)
    print(f"{len(names)} scan(s) encoded -> {path} (y_sem {arrays['y_sem'].shape}"
          + (f", z_T {arrays['z_T'].shape})" if "z_T" in arrays else ")"))
    return 0
