"""Baseline: a DiffAE-style diffusion autoencoder in *voxel* space (paper tables 5 and 7) — networks and
inference (training: :mod:`ldae.training.voxel_dae`).

What it is. The same 2.5D semantic encoder as LDAE (:func:`ldae.nets.semantic_encoder.build_semantic_encoder`)
and a conditional 3D UNet that predicts ε on the image itself (1 channel, the preset's image grid), both
trained jointly from scratch with the plain ε-MSE loss (Preechakul et al., DiffAE):

    y = Enc(x_0),  t ~ U{0..T-1},  ε ~ N(0, I),  loss = ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t, y)‖².

Every residual block of the UNet — encoder path, middle and decoder path — is conditioned through AdaGN
on the time embedding and on y: ``GroupNorm(h)·(1 + s_t) + b_t`` then ``·(1 + W_y·y)``
(:class:`ldae.nets.unet.ResBlock` with ``cond_dim``). This is what LDAE avoids: every DDIM step runs a
full-resolution 3D UNet instead of one on the autoencoder's latent grid (8× smaller per axis in the paper
preset), which is the source of the paper's ~20× speed ratio (``ldae bench`` measures it at equal steps).

Intensity convention. Volumes enter and leave every public call as ``(B, 1, D, H, W)`` in [0, 1] (the
encoder sees them like that); the diffusion runs on ``2·x − 1`` in [-1, 1], and decoded volumes are mapped
back and clamped to [0, 1]. ``x_T`` (from :meth:`VoxelDAE.encode`) lives in the [-1, 1] diffusion space.
DDIM never clamps the predicted x_0 unless ``inference.clip`` is set (clamping breaks invertibility).

Checkpoints hold the raw (``net.*``) and EMA weights (``ema.module.*``, used for inference), read by
:func:`load_voxel_dae` through :mod:`ldae.checkpoints` (no Lightning needed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldae.checkpoints import load_frozen, open_checkpoint
from ldae.config import get_dotted
from ldae.data.transforms import ModelReadyInput
from ldae.diffusion.ddim import ddim_invert, ddim_sample
from ldae.diffusion.schedule import NoiseSchedule
from ldae.errors import ConfigError
from ldae.nets.semantic_encoder import SemanticEncoder, build_semantic_encoder
from ldae.nets.unet import (
    DecoderPath,
    TimeEmbedding,
    check_config,
    condition_width,
    count_parameters,
    encoder_blocks,
    run_encoder,
)
from ldae.nets.weights import freeze

Tensor = torch.Tensor
STAGE = "voxel_dae"
EMA_PREFIX = "ema.module."
RAW_PREFIX = "net."


def to_diffusion(x: Tensor) -> Tensor:
    """[0, 1] volumes -> the [-1, 1] space the diffusion runs in."""
    return 2.0 * x - 1.0


def from_diffusion(v: Tensor) -> Tensor:
    """Diffusion-space volumes -> [0, 1], clamped."""
    return ((v + 1.0) * 0.5).clamp(0.0, 1.0)


# ---------------------------------------------------------------------- networks


class ConditionalUNet(nn.Module):
    """ε_θ(x_t, t, y): the :class:`ldae.nets.unet.LatentUNet` layout with **every** ResBlock (encoder
    path too) conditioned on y by AdaGN, as in DiffAE. Output layer and residual branches are
    zero-initialised, so y has no effect until training moves them.

    Args:
        unet_cfg: a UNet ``model`` section (keys of :data:`ldae.nets.unet.CONFIG_KEYS`; ``in_channels`` 1).
        cond_dim: width of y (the semantic encoder's ``emb_dim``).
    """

    def __init__(self, unet_cfg: dict, cond_dim: int) -> None:
        super().__init__()
        cfg = check_config(dict(unet_cfg))
        self.config = cfg
        self.cond_dim = condition_width(cond_dim, "voxel DAE")
        self.time_embed = TimeEmbedding(cfg["channels"][0])
        self.input_blocks = encoder_blocks(cfg, self.cond_dim)
        self.decoder = DecoderPath(cfg, cond_dim=self.cond_dim)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Noise prediction for ``x`` ``(B, C, D, H, W)``, timesteps ``t`` ``(B,)`` and condition ``y`` ``(B, cond_dim)``."""
        emb = self.time_embed(t)
        h, skips = run_encoder(self.input_blocks, x, emb, y)
        h = self.decoder.middle(h, emb, y)
        return self.decoder.up(h, skips, emb, y)


class VoxelDAENet(nn.Module):
    """Semantic encoder + conditional UNet, one module so that EMA and checkpoints cover both."""

    def __init__(self, encoder: SemanticEncoder, unet: ConditionalUNet) -> None:
        super().__init__()
        self.encoder = encoder
        self.unet = unet

    def semantic(self, x: Tensor) -> Tensor:
        """y of volumes ``x`` in [0, 1]."""
        return self.encoder(x)

    def eps(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """ε_θ(x_t, t, y) in float32 (``x_t`` in the [-1, 1] diffusion space)."""
        return self.unet(x_t, t, y).float()

    def loss(self, x: Tensor, schedule: NoiseSchedule, generator: torch.Generator | None = None) -> Tensor:
        """ε-MSE at uniform random timesteps (``generator`` on the CPU makes them reproducible)."""
        b = x.shape[0]
        x0 = to_diffusion(x.float())
        if generator is None:
            t = torch.randint(0, schedule.T, (b,), device=x.device)
            noise = torch.randn_like(x0)
        else:
            t = torch.randint(0, schedule.T, (b,), generator=generator).to(x.device)
            noise = torch.randn(x0.shape, generator=generator).to(x.device)
        y = self.semantic(x)
        return F.mse_loss(self.eps(schedule.q_sample(x0, t, noise), t, y), noise)


def check_model_config(cfg: dict) -> None:
    """ConfigError naming the key for a ``model`` section the voxel DAE cannot use."""
    model = cfg.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("unet"), dict):
        raise ConfigError(f"config section 'model.unet' is missing (stage '{STAGE}')")
    if not isinstance(model.get("semantic_encoder"), dict):
        raise ConfigError(f"config section 'model.semantic_encoder' is missing (stage '{STAGE}')")
    unet = check_config(dict(model["unet"]))
    if unet["in_channels"] != 1 or unet["out_channels"] != 1:
        raise ConfigError("config keys 'model.unet.in_channels'/'out_channels' must be 1 (the voxel DAE "
                          f"denoises 1-channel images), got {unet['in_channels']}/{unet['out_channels']}")
    shape = get_dotted(cfg, "data.shape")
    n_slices = get_dotted(cfg, "model.semantic_encoder.num_slices")
    if isinstance(shape, list) and len(shape) == 3 and n_slices != shape[-1]:
        raise ConfigError(f"config key 'model.semantic_encoder.num_slices' is {n_slices} but data.shape "
                          f"{shape} has {shape[-1]} axial slices")


def build_network(cfg: dict, load_pretrained: bool = True) -> VoxelDAENet:
    """The (untrained) encoder + conditional UNet of a voxel-DAE config."""
    check_model_config(cfg)
    encoder = build_semantic_encoder(cfg["model"]["semantic_encoder"], load_pretrained=load_pretrained)
    unet = ConditionalUNet(cfg["model"]["unet"], encoder.emb_dim)
    return VoxelDAENet(encoder, unet)


def parameter_counts(cfg: dict) -> dict[str, int]:
    """Parameters of the encoder and UNet of a config, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        net = build_network(cfg, load_pretrained=False)
    counts = {"semantic_encoder": count_parameters(net.encoder), "unet": count_parameters(net.unet)}
    counts["total"] = counts["semantic_encoder"] + counts["unet"]
    return counts


# ---------------------------------------------------------------------- inference


@dataclass
class VoxelDAE(ModelReadyInput):
    """A voxel-space diffusion autoencoder for inference (same conventions as :class:`ldae.model.LDAE`).

    ``x`` volumes are ``(B, 1, D, H, W)`` in [0, 1]; ``x_T`` is in the [-1, 1] diffusion space.
    """

    net: VoxelDAENet
    schedule: NoiseSchedule
    spacing: float | Sequence[float]
    shape: tuple[int, ...]
    steps: int
    cfg: dict
    clip: float | None = None
    checkpoint: Path | None = field(default=None)

    @classmethod
    def from_config(cls, cfg: dict, device: str | torch.device = "cpu") -> VoxelDAE:
        """An untrained (randomly initialised) model of a config, e.g. for ``ldae bench`` timings."""
        check_model_config(cfg)
        net = freeze(build_network(cfg, load_pretrained=False).to(device))
        return cls(net=net, schedule=NoiseSchedule.from_config(cfg["diffusion"]), spacing=cfg["data"]["spacing"],
                   shape=tuple(int(s) for s in cfg["data"]["shape"]), steps=int(cfg["inference"]["ddim_steps"]),
                   cfg=cfg, clip=cfg["inference"].get("clip"))

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def eps_fn(self, y: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        """``eps_fn(x_t, t)`` for :mod:`ldae.diffusion.ddim`, conditioned on ``y``."""
        return lambda x_t, t: self.net.eps(x_t, t, y).to(x_t.dtype)

    @torch.no_grad()
    def semantic(self, x: Tensor) -> Tensor:
        """y of volumes ``x`` ``(B, emb_dim)``."""
        return self.net.semantic(self._check(x))

    @torch.no_grad()
    def encode(self, x: Tensor, steps: int | None = None) -> tuple[Tensor, Tensor]:
        """``(y, x_T)``: the semantic vector and the conditional DDIM inversion of the image."""
        x = self._check(x)
        y = self.net.semantic(x)
        return y, ddim_invert(self.eps_fn(y), to_diffusion(x), self.schedule, int(steps or self.steps))

    @torch.no_grad()
    def decode(self, y: Tensor, x_T: Tensor, steps: int | None = None, eta: float = 0.0,
               generator: torch.Generator | None = None) -> Tensor:
        """Volumes in [0, 1] by conditional DDIM sampling from ``x_T``."""
        x_T = x_T.to(self.device, torch.float32)
        v = ddim_sample(self.eps_fn(y.to(self.device)), x_T, self.schedule, int(steps or self.steps), eta=eta,
                        clip=self.clip, generator=generator)
        return from_diffusion(v)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, steps: int | None = None) -> Tensor:
        """Encode then decode."""
        y, x_T = self.encode(x, steps)
        return self.decode(y, x_T, steps)

    @torch.no_grad()
    def semantic_only(self, x: Tensor, steps: int | None = None, seed: int = 0) -> Tensor:
        """Decode y of ``x`` from random x_T (what the semantic vector alone determines)."""
        y = self.semantic(x)
        gen = torch.Generator().manual_seed(int(seed))
        x_T = torch.randn((x.shape[0], 1, *self.shape), generator=gen)
        return self.decode(y, x_T, steps)


def load_voxel_dae(ckpt_path: str | Path, device: str | torch.device = "cpu", steps: int | None = None,
                   ema: bool = True) -> VoxelDAE:
    """The (EMA by default) encoder + UNet of a voxel-DAE checkpoint: strict load, frozen, eval mode.
    CheckpointError for another stage's checkpoint or mismatching weights."""
    ckpt = open_checkpoint(ckpt_path, STAGE)
    cfg = ckpt.config
    net = build_network(cfg, load_pretrained=False)
    prefix = (ckpt.meta.ema_prefix or EMA_PREFIX) if ema else RAW_PREFIX
    load_frozen(net, ckpt, prefix, device, "EMA weights" if ema else "weights")
    return VoxelDAE(net=net, schedule=NoiseSchedule.from_config(cfg["diffusion"]), spacing=cfg["data"]["spacing"],
                    shape=tuple(int(s) for s in cfg["data"]["shape"]),
                    steps=int(steps or cfg["inference"]["ddim_steps"]), cfg=cfg, clip=cfg["inference"].get("clip"),
                    checkpoint=Path(ckpt_path))

