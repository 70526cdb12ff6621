"""``ldae import-official``: the published LDAE weights as an ldae run folder (``LDAE.load(RUN)``)."""

from __future__ import annotations

import argparse

HELP = "import the published LDAE release (autoencoderkl.pth, encoder.pth, decoder.pth, ...) as a run folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--autoencoder", required=True, metavar="autoencoderkl.pth", help="the release's AutoencoderKL")
    p.add_argument("--encoder", required=True, metavar="encoder.pth", help="the release's semantic encoder")
    p.add_argument("--decoder", required=True, metavar="decoder.pth",
                   help="the release's decoder (latent UNet + gradient estimator)")
    p.add_argument("--classifier", default=None, metavar="disease_classifier.ckpt",
                   help="the release's AD-vs-CN classifier on y_sem (used by `ldae predict`, `ldae manipulate`)")
    p.add_argument("--semantic-mean", default=None, metavar="semantic_mean.pt", help="y_sem mean of the release")
    p.add_argument("--semantic-std", default=None, metavar="semantic_std.pt", help="y_sem std of the release")
    p.add_argument("--scale-factor", type=float, default=None,
                   help="latent scale factor (default: the release's 0.8730)")
    p.add_argument("--autoencoder-norm-groups", type=int, default=None, metavar="N",
                   help="GroupNorm groups of the autoencoder, which its tensors do not store (default: the "
                        "release's 32)")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder to create (new or empty)")


def main(args: argparse.Namespace) -> int:
    from ldae.jobs.import_official import import_official

    out = import_official(args.out, args.autoencoder, args.encoder, args.decoder, classifier=args.classifier,
                          semantic_mean=args.semantic_mean, semantic_std=args.semantic_std,
                          scale_factor=args.scale_factor, autoencoder_norm_groups=args.autoencoder_norm_groups)
    print(f"imported the official LDAE release -> {out}  (use it as --model {out})")
    return 0
