"""``ldae compress``: encode a cohort with a trained stage-1 autoencoder (latents + scale factor)."""

from __future__ import annotations

import argparse

from ldae.commands._args import add_parallel_arguments

HELP = "encode every scan of a cohort to its latent (posterior mean) with a trained autoencoder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--autoencoder", required=True,
                   help="stage-1 checkpoint, its run folder, or a full run folder (RUN/autoencoder/...)")
    p.add_argument("--csv", required=True, help="cohort CSV (subject, session, path, diagnosis, age[, split])")
    p.add_argument("--out", help="output folder (default: latents/ beside the autoencoder's run folder)")
    p.add_argument("--batch-size", type=int, default=4, help="scans encoded per forward pass (default 4)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default cpu)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    add_parallel_arguments(p)
    p.add_argument("--force", action="store_true", help="re-encode latents that are already up to date")


def main(args: argparse.Namespace) -> int:
    from ldae.data.latents import read_latent_meta
    from ldae.distributed import is_main_process
    from ldae.jobs.compress import compress
    from ldae.runs import find_checkpoint

    ckpt = find_checkpoint(args.autoencoder, "autoencoder")
    out_csv = compress(ckpt, args.csv, out_dir=args.out, batch_size=args.batch_size, device=args.device,
                       num_workers=args.num_workers, progress=True, force=args.force, devices=args.devices,
                       num_nodes=args.num_nodes)
    if not is_main_process():
        return 0
    meta = read_latent_meta(out_csv)
    print(f"latents: {out_csv} ({meta['n_latents']} scans, {meta['encoded_last_run']} encoded now, "
          f"latent shape {tuple(meta['latent_shape'])}, scale factor {meta['scale_factor']:.6g})")
    return 0
