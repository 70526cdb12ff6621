"""``ldae reconstruct``: LDAE reconstructions (encode then decode) as NIfTI + PNG."""

from __future__ import annotations

import argparse

from ldae.commands import _inference

HELP = "reconstruct scans with a trained LDAE (NIfTI + PNG per scan)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    _inference.add_common(p)


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ldae.metrics import ssim3d
    from ldae.viz import save_mosaic

    model, items, _ = _inference.load(args)
    out = Path(args.out)
    for name, vol, affine in items:
        recon = model.reconstruct(vol)
        _inference.save_volume(out, f"{name}_recon", recon[0], affine)
        ssim = float(ssim3d(recon, vol)[0])
        save_mosaic(out / f"{name}_recon.png", [("input", vol[0]), ("LDAE reconstruction", recon[0]),
                                               ("|error|", (recon[0] - vol[0]).abs())],
                    title=f"{name}: SSIM {ssim:.3f} ({model.steps} DDIM steps)")
        print(f"{name}: SSIM {ssim:.4f} -> {out / (name + '_recon.nii.gz')}")
    return 0
