"""Baseline: a DiffAE-style diffusion autoencoder in *voxel* space (paper tables 5 and 7).

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

Validation logs ``val/loss`` (EMA models, fixed noise), ``val/ssim_encoded`` (conditional DDIM inversion
then sampling, ``validation.ddim_steps`` each way; selects ``best.ckpt``), ``val/ssim_semantic`` (y of the
scan, random x_T) and ``val/mse_encoded``, and saves an input / encoded / semantic-only / |error| mosaic.
Checkpoints hold the raw and EMA weights (``ema.module.*``, used for inference).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldae.checkpoints import load_checkpoint, stage_metadata
from ldae.config import get_dotted
from ldae.data.transforms import ModelReadyInput
from ldae.diffusion.ddim import ddim_invert, ddim_sample
from ldae.diffusion.schedule import NoiseSchedule
from ldae.errors import CheckpointError, ConfigError
from ldae.nets.semantic_encoder import SemanticEncoder, build_semantic_encoder
from ldae.nets.unet import (
    AttentionBlock,
    Block,
    DecoderPath,
    Downsample,
    ResBlock,
    TimeEmbedding,
    check_config,
    count_parameters,
)
from ldae.nets.weights import load_state_dict_strict
from ldae.training.common import (
    check_ema_decay,
    prepare_run,
    require_sections,
    train,
)
from ldae.training.ema import EMA, EMAStepMixin, adam_from_config, freeze

log = logging.getLogger(__name__)

Tensor = torch.Tensor
STAGE = "voxel_dae"
MONITOR = "val/ssim_encoded"
EMA_PREFIX = "ema.module."
SECTIONS = ("data", "model", "diffusion", "ema", "optim", "validation", "inference", "trainer")


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
        if int(cond_dim) < 1:
            raise ConfigError(f"voxel DAE condition width must be >= 1, got {cond_dim}")
        self.config = cfg
        self.cond_dim = int(cond_dim)
        chans, groups, heads = cfg["channels"], int(cfg["norm_num_groups"]), int(cfg["num_heads"])
        emb_dim, drop = 4 * chans[0], float(cfg["dropout"])
        self.time_embed = TimeEmbedding(chans[0])
        self.input_blocks = nn.ModuleList([Block([nn.Conv3d(int(cfg["in_channels"]), chans[0], 3, padding=1)])])
        ch = chans[0]
        for i, out_ch in enumerate(chans):
            for _ in range(int(cfg["num_res_blocks"])):
                layers: list[nn.Module] = [ResBlock(ch, out_ch, emb_dim, drop, groups, self.cond_dim)]
                ch = out_ch
                if 2**i in cfg["attention_factors"]:
                    layers.append(AttentionBlock(ch, heads, groups))
                self.input_blocks.append(Block(layers))
            if i < len(chans) - 1:
                self.input_blocks.append(Block([Downsample(ch)]))
        self.decoder = DecoderPath(cfg, cond_dim=self.cond_dim)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Noise prediction for ``x`` ``(B, C, D, H, W)``, timesteps ``t`` ``(B,)`` and condition ``y`` ``(B, cond_dim)``."""
        emb = self.time_embed(t)
        skips: list[Tensor] = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, y)
            skips.append(h)
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


# ---------------------------------------------------------------------- training module


class VoxelDAEModule(EMAStepMixin, pl.LightningModule):
    """Joint training of encoder + conditional UNet on images, with an EMA copy of both."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = build_network(cfg)
        self.ema = EMA(self.net, decay=float(cfg["ema"]["decay"]), warmup=bool(cfg["ema"].get("warmup", False)))
        self.schedule = NoiseSchedule.from_config(cfg["diffusion"])
        self.out = Path(cfg["out"]) if cfg.get("out") else None
        self._val: dict[str, list[Tensor]] = {}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x = batch["image"]
        loss = self.net.loss(x, self.schedule)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x.shape[0])
        return loss

    def ema_pairs(self) -> list[tuple[EMA, nn.Module]]:
        return [(self.ema, self.net)]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adam_from_config(self.net.parameters(), self.cfg["optim"])

    def on_validation_epoch_start(self) -> None:
        self._val = {"loss": [], "ssim_encoded": [], "ssim_semantic": [], "mse_encoded": []}

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        from ldae.metrics import ssim3d

        x = batch["image"].float()
        net = self.ema.module
        gen = torch.Generator().manual_seed(int(self.cfg.get("seed", 0)) * 1000 + batch_idx)
        self._val["loss"].append(net.loss(x, self.schedule, gen).reshape(1))
        model = VoxelDAE(net=net, schedule=self.schedule, spacing=self.cfg["data"]["spacing"],
                         shape=tuple(self.cfg["data"]["shape"]), steps=int(self.cfg["validation"]["ddim_steps"]),
                         cfg=self.cfg, clip=self.cfg["inference"].get("clip"))
        x_rand = torch.randn(x.shape, generator=gen).to(x)
        with torch.autocast(self.device.type, enabled=False):  # DDIM round trips in fp32 (bf16 ε degrades inversion)
            y, x_T = model.encode(x)
            encoded = model.decode(y, x_T)
            semantic = model.decode(y, x_rand)
        self._val["ssim_encoded"].append(ssim3d(encoded, x))
        self._val["ssim_semantic"].append(ssim3d(semantic, x))
        self._val["mse_encoded"].append((encoded - x).pow(2).flatten(1).mean(1))
        if batch_idx == 0 and self.out is not None and not self.trainer.sanity_checking and self.trainer.is_global_zero:
            from ldae.viz import save_mosaic

            rows = [("input", x[0]), ("encoded recon", encoded[0]), ("semantic-only", semantic[0]),
                    ("|encoded - input|", (encoded[0] - x[0]).abs())]
            save_mosaic(self.out / "figures" / f"recon_epoch{self.current_epoch:03d}.png", rows,
                        title=f"voxel DAE, epoch {self.current_epoch}: {model.steps} DDIM steps")

    def on_validation_epoch_end(self) -> None:
        for key, values in self._val.items():
            if values:
                value = torch.cat([v.reshape(-1).float().cpu() for v in values]).mean()
                self.log(f"val/{key}", value, prog_bar=key == "ssim_encoded", sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = stage_metadata(self.cfg, STAGE)
        meta.update(ema_prefix=EMA_PREFIX, spacing=self.cfg["data"]["spacing"],
                    shape=[int(s) for s in self.cfg["data"]["shape"]])
        checkpoint["ldae"] = meta


# ---------------------------------------------------------------------- entry points


def _validate(cfg: dict) -> None:
    require_sections(cfg, SECTIONS, STAGE)
    check_ema_decay(cfg)
    for key in ("validation.ddim_steps", "inference.ddim_steps"):
        value = get_dotted(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"config key '{key}' must be an integer >= 1, got {value!r}")
    schedule = NoiseSchedule.from_config(cfg["diffusion"])
    for key in ("validation.ddim_steps", "inference.ddim_steps"):
        if get_dotted(cfg, key) > schedule.T:
            raise ConfigError(f"config key '{key}' must be <= diffusion.timesteps ({schedule.T})")
    check_model_config(cfg)


def make_datamodule(cfg: dict) -> Any:
    """The image data module of a baseline config's ``data`` section (raw cohort CSV)."""
    from ldae.data.datamodule import VolumeDataModule
    from ldae.training.common import make_datamodule as _make

    data = cfg["data"]
    return _make(VolumeDataModule, cfg, spacing=data["spacing"], shape=data["shape"],
                 cache=bool(data.get("cache", False)))


def fit(cfg: dict, resume: bool = False) -> Path:
    """Train the voxel DAE; return ``out/checkpoints/best.ckpt`` (highest ``val/ssim_encoded``)."""
    from ldae.training.common import resolve_precision

    cfg = copy.deepcopy(cfg)
    _validate(cfg)
    cfg["trainer"]["precision"] = resolve_precision(cfg["trainer"])
    datamodule = make_datamodule(cfg)
    out, resume_ckpt = prepare_run(cfg, resume)
    pl.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
    module = VoxelDAEModule(cfg)
    return train(module, datamodule, cfg, out, resume_ckpt, MONITOR, "max")


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
    ckpt = load_checkpoint(ckpt_path, stage=STAGE)
    meta, state = ckpt["ldae"], ckpt.get("state_dict")
    cfg = meta.get("config")
    if not isinstance(cfg, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{ckpt_path}: checkpoint lacks its config or state_dict")
    net = build_network(cfg, load_pretrained=False)
    prefix = meta.get("ema_prefix", EMA_PREFIX) if ema else "net."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    load_state_dict_strict(net, weights, f"{ckpt_path} ({'EMA ' if ema else ''}weights)")
    freeze(net.to(device))
    return VoxelDAE(net=net, schedule=NoiseSchedule.from_config(cfg["diffusion"]), spacing=cfg["data"]["spacing"],
                    shape=tuple(int(s) for s in cfg["data"]["shape"]),
                    steps=int(steps or cfg["inference"]["ddim_steps"]), cfg=cfg, clip=cfg["inference"].get("clip"),
                    checkpoint=Path(ckpt_path))
