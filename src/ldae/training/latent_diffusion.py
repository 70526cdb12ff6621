"""Stage 2: unconditional latent DDPM (ε-prediction) on the autoencoder's scaled latents.

Inputs: ``data.csv`` = the compressed cohort CSV (column ``latent_path``) written by ``ldae compress``,
with ``latent_meta.json`` beside it (``scale_factor``, ``latent_shape``, ``autoencoder_checkpoint``).
The model is trained on ``latent · scale_factor`` (unit variance); the factor is read from that file,
never assumed.

Training: t ~ U{0..T-1}, ε ~ N(0, I), loss ‖ε − ε_θ(√ᾱ_t z + √(1−ᾱ_t) ε, t)‖²; Adam; gradient clipping
by the trainer (``trainer.gradient_clip_val``); EMA of the UNet after every optimizer step.
Validation: ``val/loss`` of the EMA UNet with fixed noise and timesteps (monitored for ``best.ckpt``),
and every ``validation.sample_every_n_epochs`` epochs a few DDIM samples decoded through the autoencoder
into ``figures/samples_epochNNN.png`` (latent channels are shown instead, with a logged notice, when no
autoencoder can be loaded). Checkpoints carry the EMA weights (``ema.module.*``) and, as their
:class:`ldae.checkpoints.StageMetadata`, the scale factor, the latent shape and the autoencoder the
latents came from (path, path relative to the checkpoint, weights fingerprint from ``latent_meta.json``).
The inference side (:class:`ldae.checkpoints.LatentDiffusion`) is loaded by
:func:`ldae.checkpoints.load_latent_diffusion`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from ldae.checkpoints import (
    DIFFUSION_EMA_PREFIX,
    UpstreamRef,
    attach_metadata,
    checkpoint_dir,
    load_autoencoder,
    stage_metadata,
)
from ldae.config import get_dotted
from ldae.data.latents import read_latent_meta
from ldae.diffusion.ddim import ddim_sample
from ldae.diffusion.schedule import NoiseSchedule
from ldae.errors import ConfigError
from ldae.nets.fast_conv import use_fast_conv3d
from ldae.nets.unet import LatentUNet, check_config
from ldae.training.common import (
    check_ema_decay,
    make_datamodule,
    prepare_run,
    require_sections,
    train,
)
from ldae.training.ema import EMA, EMAStepMixin, adam_from_config

log = logging.getLogger(__name__)

STAGE = "diffusion"
MONITOR = "val/loss"
SECTIONS = ("data", "model", "diffusion", "ema", "optim", "validation", "trainer")


# ---------------------------------------------------------------------- latent metadata


def load_autoencoder_or_none(ckpt: str | Path | None, device: torch.device | str) -> tuple[Any, dict] | None:
    """:func:`ldae.checkpoints.load_autoencoder` of ``ckpt``, or None (with a logged notice) when there is
    no such checkpoint."""
    if not ckpt or not Path(ckpt).is_file():
        log.info("no autoencoder checkpoint (%s): sample figures show latent channels instead", ckpt)
        return None
    return load_autoencoder(ckpt, device)


# ---------------------------------------------------------------------- training module


class LatentDiffusionModule(EMAStepMixin, pl.LightningModule):
    """ε-prediction training of :class:`LatentUNet` on scaled latents, with an EMA copy."""

    def __init__(
        self,
        cfg: dict,
        scale_factor: float,
        latent_shape: list[int],
        autoencoder_checkpoint: str | None = None,
        autoencoder_fingerprint: str | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.scale_factor = float(scale_factor)
        self.latent_shape = [int(s) for s in latent_shape]
        self.autoencoder_checkpoint = autoencoder_checkpoint
        self.autoencoder_fingerprint = autoencoder_fingerprint
        self.unet = LatentUNet.from_config(cfg["model"])
        if self.unet.config["in_channels"] != self.latent_shape[0]:
            raise ConfigError(
                f"config key 'model.in_channels' is {self.unet.config['in_channels']} but the latents have "
                f"{self.latent_shape[0]} channels"
            )
        # weights saved under checkpoints.DIFFUSION_EMA_PREFIX (what inference loads)
        self.ema = EMA(self.unet, decay=float(cfg["ema"]["decay"]), warmup=bool(cfg["ema"].get("warmup", False)))
        self.schedule = NoiseSchedule.from_config(cfg["diffusion"])
        self.out = Path(cfg["out"])
        self._autoencoder: list = []  # [(net, cfg) or None], loaded lazily, kept out of the state dict
        use_fast_conv3d(self)  # CPUs without AVX-512: 3D weight gradients as forward convolutions (issue 19)

    # -------------------------------------------------------------- losses
    def diffusion_loss(self, net: torch.nn.Module, z0: torch.Tensor, generator: torch.Generator | None = None):
        """Mean squared error of the noise prediction at random timesteps (``generator`` on the CPU
        makes them reproducible)."""
        b = z0.shape[0]
        if generator is None:
            t = torch.randint(0, self.schedule.T, (b,), device=z0.device)
            noise = torch.randn_like(z0)
        else:
            t = torch.randint(0, self.schedule.T, (b,), generator=generator).to(z0.device)
            noise = torch.randn(z0.shape, generator=generator, dtype=z0.dtype).to(z0.device)
        z_t = self.schedule.q_sample(z0, t, noise)
        return F.mse_loss(net(z_t, t).float(), noise.float())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        z0 = batch["latent"] * self.scale_factor
        loss = self.diffusion_loss(self.unet, z0)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=z0.shape[0])
        return loss

    def ema_pairs(self) -> list[tuple[EMA, torch.nn.Module]]:
        return [(self.ema, self.unet)]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        z0 = batch["latent"] * self.scale_factor
        gen = torch.Generator().manual_seed(int(self.cfg.get("seed", 0)) * 1000 + batch_idx)
        state = gen.get_state()
        loss = self.diffusion_loss(self.ema.module, z0, gen)
        gen.set_state(state)
        raw = self.diffusion_loss(self.unet, z0, gen)
        self.log(MONITOR, loss, prog_bar=True, on_epoch=True, batch_size=z0.shape[0], sync_dist=True)
        self.log("val/loss_raw", raw, on_epoch=True, batch_size=z0.shape[0], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        every = int(get_dotted(self.cfg, "validation.sample_every_n_epochs", 0) or 0)
        if self.trainer.sanity_checking or every <= 0 or (self.current_epoch + 1) % every:
            return
        if self.trainer.is_global_zero:
            self.save_samples()

    @torch.no_grad()
    def save_samples(self) -> Path:
        """DDIM samples of the EMA UNet, decoded when an autoencoder is available, as a PNG mosaic."""
        from ldae.viz import save_mosaic

        vcfg = self.cfg["validation"]
        n, steps = int(vcfg.get("n_samples", 2)), int(vcfg.get("ddim_steps", 50))
        gen = torch.Generator().manual_seed(int(self.cfg.get("seed", 0)))
        z_T = torch.randn((n, *self.latent_shape), generator=gen).to(self.device)
        z = ddim_sample(self.ema.module, z_T, self.schedule, steps) / self.scale_factor
        self.log("val/sample_std", float(z.std() * self.scale_factor))
        if not self._autoencoder:
            self._autoencoder.append(load_autoencoder_or_none(self.autoencoder_checkpoint, self.device))
        path = self.out / "figures" / f"samples_epoch{self.current_epoch:03d}.png"
        title = f"epoch {self.current_epoch}: {n} DDIM samples ({steps} steps)"
        if self._autoencoder[0] is not None:
            ae = self._autoencoder[0][0]
            vols = ae.decode(z.to(next(ae.parameters()).dtype)).float()
            rows = [(f"sample {i}", vols[i]) for i in range(n)]
            return save_mosaic(path, rows, title=title)
        rows = [(f"sample {i} latent ch{c}", z[i, c]) for i in range(n) for c in range(z.shape[1])]
        return save_mosaic(path, rows, vmin=None, vmax=None, title=title + " (latents)")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adam_from_config(self.unet.parameters(), self.cfg["optim"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        upstream = {}
        if self.autoencoder_checkpoint:
            upstream["autoencoder"] = UpstreamRef.to(self.autoencoder_checkpoint, checkpoint_dir(self.cfg),
                                                     self.autoencoder_fingerprint)
        attach_metadata(checkpoint, stage_metadata(
            self.cfg, STAGE, scale_factor=self.scale_factor, latent_shape=self.latent_shape,
            ema_prefix=DIFFUSION_EMA_PREFIX, upstream=upstream))


# ---------------------------------------------------------------------- entry points


def _validate(cfg: dict) -> None:
    require_sections(cfg, SECTIONS, STAGE, "RUN/latents/cohort_with_compressed_latent.csv")
    check_ema_decay(cfg)
    NoiseSchedule.from_config(cfg["diffusion"])
    check_config(cfg["model"])


def fit(cfg: dict, resume: bool = False) -> Path:
    """Train stage 2 from a resolved config; return ``out/checkpoints/best.ckpt`` (lowest ``val/loss``)."""
    from ldae.data.datamodule import LatentDataModule
    from ldae.training.common import resolve_precision

    cfg = copy.deepcopy(cfg)
    _validate(cfg)
    cfg["trainer"]["precision"] = resolve_precision(cfg["trainer"])  # bf16 -> 32-true on old GPUs
    data = cfg["data"]
    meta = read_latent_meta(data["csv"])
    datamodule = make_datamodule(LatentDataModule, cfg, latent_shape=meta["latent_shape"])
    datamodule.setup("fit")  # reads every latent: a bad NPZ fails here, before a run folder is created
    pl.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
    module = LatentDiffusionModule(cfg, meta["scale_factor"], meta["latent_shape"], meta["autoencoder_checkpoint"],
                                   meta.get("autoencoder_fingerprint"))
    out, resume_ckpt = prepare_run(cfg, resume)
    return train(module, datamodule, cfg, out, resume_ckpt, MONITOR, "min")

