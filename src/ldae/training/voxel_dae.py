"""Training of the voxel-space diffusion autoencoder baseline (``ldae fit --stage voxel_dae``); the
networks, the loss and inference live in :mod:`ldae.baselines.voxel_dae`.

Validation logs ``val/loss`` (EMA models, fixed noise), ``val/ssim_encoded`` (conditional DDIM inversion
then sampling, ``validation.ddim_steps`` each way; selects ``best.ckpt``), ``val/ssim_semantic`` (y of the
scan, random x_T) and ``val/mse_encoded``, and saves an input / encoded / semantic-only / |error| mosaic.
Checkpoints hold the raw (``net.*``) and EMA weights (``ema.module.*``, used for inference).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from ldae.baselines.voxel_dae import EMA_PREFIX, STAGE, VoxelDAE, build_network, check_model_config
from ldae.checkpoints import attach_metadata, stage_metadata
from ldae.config import get_dotted
from ldae.diffusion.schedule import NoiseSchedule
from ldae.errors import ConfigError
from ldae.nets.fast_conv import use_fast_conv3d
from ldae.training.common import (
    check_ema_decay,
    prepare_run,
    require_sections,
    train,
)
from ldae.training.ema import EMA, EMACodeNorm, EMAStepMixin, adam_from_config

log = logging.getLogger(__name__)

Tensor = torch.Tensor
MONITOR = "val/ssim_encoded"
SECTIONS = ("data", "model", "diffusion", "ema", "optim", "validation", "inference", "trainer")


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
        self.code_norm = EMACodeNorm(EMA_PREFIX + "encoder.")  # the EMA encoder's CodeNorm statistics
        use_fast_conv3d(self)  # CPUs without AVX-512: 3D weight gradients as forward convolutions (issue 19)

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
        self.code_norm.calibrate(self, self.ema.module.encoder)  # validation and best.ckpt use the EMA copy
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
        self.code_norm.on_save_checkpoint(self, self.ema.module.encoder, checkpoint)
        attach_metadata(checkpoint, stage_metadata(
            self.cfg, STAGE, ema_prefix=EMA_PREFIX, spacing=self.cfg["data"]["spacing"],
            shape=[int(s) for s in self.cfg["data"]["shape"]]))


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

