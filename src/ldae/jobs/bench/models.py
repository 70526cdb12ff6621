"""The benchmarked models: the library's own inference classes (:class:`ldae.model.LDAE`,
:class:`ldae.baselines.voxel_dae.VoxelDAE`) holding randomly initialised networks of the preset, built in
memory through the same factories the trained models use — so that the benchmark times the code users run,
not a copy of it.

Layers that the networks zero-initialise (output convolutions, residual branches, attention projections) are
re-initialised with their default init (:func:`ldae.jobs.bench.measure.densify`) so that outputs are not
trivially zero: timings do not depend on the values, precision differences do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ldae.jobs.bench.measure import densify
from ldae.jobs.bench.options import PresetConfigs

Tensor = torch.Tensor


def build_unet(cfgs: PresetConfigs, device: torch.device, seed: int) -> nn.Module:
    """The preset's latent UNet (random, dense, frozen) on ``device``."""
    from ldae.nets.unet import LatentUNet
    from ldae.nets.weights import freeze

    torch.manual_seed(seed)
    return freeze(densify(LatentUNet.from_config(cfgs["diffusion"]["model"])).to(device))


def build_ldae(cfgs: PresetConfigs, device: torch.device, seed: int, unet: nn.Module | None = None) -> Any:
    """An :class:`ldae.model.LDAE` of random networks of the preset (scale factor 1)."""
    from ldae.diffusion.schedule import NoiseSchedule
    from ldae.model import LDAE
    from ldae.nets.autoencoder import build_autoencoder
    from ldae.nets.semantic_encoder import build_semantic_encoder
    from ldae.nets.weights import freeze

    unet = unet if unet is not None else build_unet(cfgs, device, seed)
    torch.manual_seed(seed + 1)
    shift = freeze(densify(unet.make_shift_decoder(cfgs.emb_dim)).to(device))
    encoder = freeze(build_semantic_encoder(cfgs["representation"]["model"]["semantic_encoder"],
                                            load_pretrained=False).to(device))
    ae_cfg = dict(cfgs["autoencoder"]["model"], init_weights=None)
    autoencoder = freeze(densify(build_autoencoder(ae_cfg)).to(device))
    return LDAE(autoencoder=autoencoder, unet=unet, encoder=encoder, shift=shift,
                schedule=NoiseSchedule.from_config(cfgs["diffusion"]["diffusion"]), scale_factor=1.0,
                spacing=cfgs["autoencoder"]["data"]["spacing"], shape=cfgs.image_shape,
                latent_shape=cfgs.latent_shape)


def build_voxel_dae(cfgs: PresetConfigs, device: torch.device, seed: int) -> Any:
    """The preset's voxel-space DAE baseline (random, dense, frozen)."""
    from ldae.baselines.voxel_dae import VoxelDAE

    torch.manual_seed(seed + 2)
    model = VoxelDAE.from_config(cfgs["voxel_dae"], device)
    densify(model.net)
    return model


def unet_inputs(cfgs: PresetConfigs, device: torch.device, seed: int) -> tuple[Tensor, Tensor]:
    """A batch-1 latent of the preset's shape and the middle timestep T/2."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(1, *cfgs.latent_shape, generator=gen).to(device)
    T = int(cfgs["diffusion"]["diffusion"]["timesteps"])
    return z, torch.full((1,), T // 2, dtype=torch.long, device=device)
