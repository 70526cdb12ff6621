"""FLOPs of every benchmarked call, counted on the meta device (no memory, no time).

``torch.utils.flop_counter.FlopCounterMode`` counts matmuls, convolutions and attention (2 FLOPs per
multiply-add), not norms or activations. On the meta device attention is counted too (the CPU kernel hides it
from the counter).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ldae.jobs.bench.measure import count_flops
from ldae.jobs.bench.options import PresetConfigs


def network_gflop(cfgs: PresetConfigs) -> dict[str, float]:
    """GFLOP of every benchmarked call at batch 1, and of the LDAE conditional step with the UNet encoder
    pass shared (``conditional_step_shared``) or repeated for G_ψ (``conditional_step_separate``)."""
    from ldae.baselines.voxel_dae import build_network
    from ldae.nets.autoencoder import build_autoencoder
    from ldae.nets.semantic_encoder import build_semantic_encoder
    from ldae.nets.unet import LatentUNet

    with torch.device("meta"):
        unet = LatentUNet.from_config(cfgs["diffusion"]["model"])
        shift = unet.make_shift_decoder(cfgs.emb_dim)
        ae = build_autoencoder(dict(cfgs["autoencoder"]["model"], init_weights=None))
        enc = build_semantic_encoder(cfgs["representation"]["model"]["semantic_encoder"], load_pretrained=False)
        vox = build_network(cfgs["voxel_dae"], load_pretrained=False)
        z = torch.empty(1, *cfgs.latent_shape)
        x = torch.empty(1, 1, *cfgs.image_shape)
        t = torch.zeros(1, dtype=torch.long)
        y = torch.empty(1, cfgs.emb_dim)
        yv = torch.empty(1, vox.encoder.emb_dim)
        h, skips, emb = unet.encode(z, t)
        calls: dict[str, Callable[[], Any]] = {
            "unet_forward": lambda: unet(z, t),
            "unet_encoder": lambda: unet.encode(z, t),
            "unet_decoder": lambda: unet.decode(h, skips, emb),
            "shift_decoder": lambda: shift(skips, t, y, emb),
            "autoencoder_encode": lambda: ae.encode(x),
            "autoencoder_decode": lambda: ae.decode(z),
            "semantic_encoder": lambda: enc(x),
            "voxel_unet": lambda: vox.unet(x, t, yv),
            "voxel_semantic_encoder": lambda: vox.encoder(x),
        }
        with torch.no_grad():
            g = {name: count_flops(fn) / 1e9 for name, fn in calls.items()}
    g["conditional_step_shared"] = g["unet_encoder"] + g["unet_decoder"] + g["shift_decoder"]
    g["conditional_step_separate"] = g["conditional_step_shared"] + g["unet_encoder"]
    return g
