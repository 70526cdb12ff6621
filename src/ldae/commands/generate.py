"""``ldae generate``: unconditional samples of a trained latent DDPM, decoded to NIfTI volumes + a PNG."""

from __future__ import annotations

import argparse

HELP = "sample new volumes from a trained latent diffusion model (NIfTI + PNG)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="full run folder, diffusion stage folder, or checkpoint")
    p.add_argument("--n", type=int, default=4, help="number of samples (default 4)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity: 0 deterministic (default), 1 DDPM-like")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", help="output folder (default: MODEL/generated, or beside the checkpoint)")
    p.add_argument("--autoencoder", help="autoencoder checkpoint (default: the one the latents came from)")
    p.add_argument("--batch-size", type=int, default=4, help="samples decoded at once (default 4)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:i]")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ldae.checkpoints import UpstreamNotFound, load_latent_diffusion
    from ldae.data.geometry import model_grid_affine
    from ldae.distributed import resolve_device
    from ldae.errors import ConfigError
    from ldae.io import write_nifti
    from ldae.runs import find_checkpoint
    from ldae.viz import save_mosaic

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    ckpt = find_checkpoint(args.model, "diffusion")
    ldm = load_latent_diffusion(ckpt, device)
    try:  # the autoencoder the latents came from (or --autoencoder), its fingerprint checked
        ae = ldm.load_autoencoder(device, path=args.autoencoder)
    except UpstreamNotFound as exc:
        raise UpstreamNotFound(f"{exc}: pass --autoencoder CKPT") from None
    autoencoder = ae.net
    model = Path(args.model)
    out = Path(args.out) if args.out else (model / "generated" if model.is_dir() else ckpt.parent.parent / "generated")
    affine = model_grid_affine(ae.config["data"]["spacing"], ae.config["data"]["shape"])

    generator = torch.Generator().manual_seed(args.seed)
    latents = ldm.sample(args.n, steps=args.steps, eta=args.eta, generator=generator, progress=True)
    volumes = []
    with torch.no_grad():
        for start in range(0, args.n, args.batch_size):
            z = latents[start : start + args.batch_size]
            volumes.append(autoencoder.decode(z.to(next(autoencoder.parameters()).dtype)).float().cpu())
    volumes_t = torch.cat(volumes)[:, 0]
    paths = []
    for i, vol in enumerate(volumes_t):
        paths.append(write_nifti(out / f"sample_{i:03d}.nii.gz", vol.numpy(), affine))
    figure = save_mosaic(out / "samples.png", [(f"sample {i}", v) for i, v in enumerate(volumes_t)],
                         title=f"{args.n} samples, {args.steps} DDIM steps, seed {args.seed}")
    print(f"wrote {len(paths)} samples to {out} (figure: {figure.name})")
    return 0
