"""MONAI ``AutoencoderKL`` / ``PatchDiscriminator`` factories, stage-1 loss terms, and weight loading.

Everything is built from config sections (``model``, ``discriminator``), so presets decide sizes.
Loss terms are plain functions so that their values can be checked against closed forms.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL, PatchDiscriminator

from ldae.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

MODEL_KEYS = (
    "channels",
    "latent_channels",
    "num_res_blocks",
    "norm_num_groups",
    "norm_eps",
    "attention_levels",
    "with_encoder_nonlocal_attn",
    "with_decoder_nonlocal_attn",
    "use_checkpoint",
    "init_weights",
)


def _require(cfg: dict, key: str, section: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"config key '{section}.{key}' is not set")
    return cfg[key]


def build_autoencoder(model_cfg: dict) -> AutoencoderKL:
    """A 3D single-channel ``AutoencoderKL`` from the ``model`` config section.

    Keys: ``channels`` (per level; the latent grid is the input divided by ``2**(len(channels)-1)``),
    ``latent_channels``, ``num_res_blocks``, ``norm_num_groups``, optional ``norm_eps``,
    ``attention_levels`` (null = no attention, as in the paper), ``with_encoder_nonlocal_attn`` /
    ``with_decoder_nonlocal_attn`` (default false), ``use_checkpoint`` (activation checkpointing) and
    ``init_weights`` (a state dict to start from; see :func:`load_autoencoder_weights`).
    """
    unknown = sorted(set(model_cfg) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(f"unknown config key(s) in 'model': {', '.join(unknown)} (known: {', '.join(MODEL_KEYS)})")
    channels = [int(c) for c in _require(model_cfg, "channels", "model")]
    groups = int(_require(model_cfg, "norm_num_groups", "model"))
    bad = [c for c in channels if c % groups]
    if bad:
        raise ConfigError(f"config key 'model.channels' {channels}: every entry must be a multiple of "
                          f"model.norm_num_groups={groups}")
    attention = model_cfg.get("attention_levels") or [False] * len(channels)
    if len(attention) != len(channels):
        raise ConfigError(f"config key 'model.attention_levels' has {len(attention)} entries, "
                          f"model.channels has {len(channels)}")
    net = AutoencoderKL(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=channels,
        latent_channels=int(_require(model_cfg, "latent_channels", "model")),
        num_res_blocks=int(_require(model_cfg, "num_res_blocks", "model")),
        norm_num_groups=groups,
        norm_eps=float(model_cfg.get("norm_eps", 1e-6)),
        attention_levels=[bool(a) for a in attention],
        with_encoder_nonlocal_attn=bool(model_cfg.get("with_encoder_nonlocal_attn", False)),
        with_decoder_nonlocal_attn=bool(model_cfg.get("with_decoder_nonlocal_attn", False)),
        use_checkpoint=bool(model_cfg.get("use_checkpoint", False)),
    )
    if model_cfg.get("init_weights"):
        load_autoencoder_weights(net, model_cfg["init_weights"])
    return net


def latent_shape(model_cfg: dict, image_shape: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """``(latent_channels, d, h, w)`` for an input of spatial ``image_shape`` (ConfigError if the shape
    is not divisible by the total downsampling factor)."""
    factor = 2 ** (len(model_cfg["channels"]) - 1)
    bad = [s for s in image_shape if int(s) % factor]
    if bad:
        raise ConfigError(f"config key 'data.shape' {list(image_shape)}: every size must be divisible by "
                          f"{factor} (= 2^(len(model.channels)-1))")
    return (int(model_cfg["latent_channels"]), *(int(s) // factor for s in image_shape))


def build_discriminator(disc_cfg: dict) -> PatchDiscriminator:
    """MONAI ``PatchDiscriminator`` (3D, 1 input channel) from the ``discriminator`` section
    (``channels``, ``num_layers_d``, ``norm``)."""
    return PatchDiscriminator(
        spatial_dims=3,
        channels=int(_require(disc_cfg, "channels", "discriminator")),
        in_channels=1,
        out_channels=1,
        num_layers_d=int(_require(disc_cfg, "num_layers_d", "discriminator")),
        norm=str(disc_cfg.get("norm", "BATCH")),
    )


# --------------------------------------------------------------------------- loss terms


def l1_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all voxels and the batch (computed in float32)."""
    return F.l1_loss(recon.float(), target.float())


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent elements, averaged over the batch:
    ``0.5 * sum(mu^2 + sigma^2 - log sigma^2 - 1)``."""
    mu, sigma = z_mu.float(), z_sigma.float()
    per_sample = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2)) - 1).flatten(1).sum(dim=1)
    return per_sample.mean()


def discriminator_logits(discriminator: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The patch logits (last output) of a MONAI PatchDiscriminator, computed in float32 with autocast off:
    under bf16 autocast the least-squares adversarial terms overflowed to NaN within an epoch of the
    adversary switching on (tiny preset, CPU)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return discriminator(x.float())[-1].float()


# --------------------------------------------------------------------------- weight loading


def _unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """A plain AutoencoderKL state dict from a raw state dict, ``{'state_dict': ...}`` or a Lightning
    checkpoint of this project (``autoencoder.`` prefix stripped)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source}: not a state dict of tensors")
    prefix = "autoencoder."
    if any(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
    return dict(obj)


def load_autoencoder_weights(net: AutoencoderKL, path: str | os.PathLike) -> None:
    """Load weights from ``path`` into ``net`` strictly.

    Accepts a state dict of MONAI >= 1.4 ``AutoencoderKL`` (e.g. a public pretrained brain model), a
    ``{'state_dict': ...}`` wrapper, this project's stage-1 checkpoint, or an old MONAI Generative
    state dict, which is converted with MONAI's ``AutoencoderKL.load_old_state_dict``. Any remaining
    mismatch raises CheckpointError listing the missing/unexpected keys and shape mismatches.
    """
    from ldae.nets.weights import load_state_dict_strict

    path = Path(path)
    source = f"config key 'model.init_weights' ({path})"
    if not path.is_file():
        raise CheckpointError(f"{source}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling/zip failures mean a corrupt or foreign file
        raise CheckpointError(f"{source}: cannot load ({str(exc).splitlines()[0]})") from None
    state = _unwrap_state_dict(obj, source)
    own = net.state_dict()
    if set(state) != set(own):
        converted = _convert_old_state_dict(net, state)
        if converted is not None:
            log.info("%s: converted from the MONAI Generative format", path)
            state = converted
    load_state_dict_strict(net, state, source)


def _convert_old_state_dict(net: AutoencoderKL, state: dict[str, torch.Tensor]) -> dict | None:
    """Old MONAI Generative keys mapped to the current names via MONAI's converter, or None when the
    converter cannot make sense of ``state`` (the strict load then reports the mismatch)."""
    import contextlib
    import copy
    import io

    scratch = copy.deepcopy(net)
    remaining = dict(state)  # the converter pops every key it uses from this dict
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the converter prints progress
            scratch.load_old_state_dict(remaining)
    except (KeyError, RuntimeError):
        return None
    # the converter keeps the random init for keys it did not find: refuse partial conversions
    if remaining or len(state) != len(net.state_dict()):
        return None
    return scratch.state_dict()
