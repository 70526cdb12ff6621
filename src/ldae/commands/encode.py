"""``ldae encode``: semantic vectors y_sem and DDIM-inverted noise z_T of scans, saved to one NPZ."""

from __future__ import annotations

import argparse

from ldae.commands import _inference

HELP = "encode scans to (y_sem, z_T) with a trained LDAE and save them as NPZ"


def add_arguments(p: argparse.ArgumentParser) -> None:
    _inference.add_common(p)  # (--csv, --devices: batch inference over processes)
    p.add_argument("--semantic-only", action="store_true", help="only y_sem (no DDIM inversion: fast)")


def main(args: argparse.Namespace) -> int:
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

    done = workers.unshard(workers.gather(workers.together(encode_mine)))  # in the scans' order
    if not workers.is_main:
        return 0
    names = [name for name, _, _ in done]
    arrays = {"y_sem": np.stack([y for _, y, _ in done]), "names": np.array(names)}
    if not args.semantic_only:
        arrays["z_T"] = np.stack([z for _, _, z in done])
    path = write_npz(Path(args.out) / "encodings.npz", **arrays)
    print(f"{len(names)} scan(s) encoded -> {path} (y_sem {arrays['y_sem'].shape}"
          + (f", z_T {arrays['z_T'].shape})" if "z_T" in arrays else ")"))
    return 0
