"""Stage 3: representation learning (PDAE-style) on a frozen latent DDPM.

The semantic encoder (2.5D, on the model-ready volume) and the gradient estimator G_ψ (a shift decoder
on the frozen UNet's encoder features) are trained jointly with the SNR-weighted PDAE loss
(:func:`ldae.diffusion.pdae.pdae_loss`). The frozen UNet is held outside the module's children: it is
neither saved again in this stage's checkpoints (they reference the diffusion checkpoint) nor ever
switched to training mode by the trainer.

Validation: the weighted loss of the EMA models; SSIM of *semantic-only* reconstructions (y_sem of the
scan, random z_T) and of *encoded* reconstructions (z_T by conditional DDIM inversion), both against
the autoencoder's reconstruction of the scan — the semantic-only SSIM selects the best checkpoint.
After training, the mean/std of y_sem over the training split are stored beside the checkpoints
(``ysem_stats.json``) for manipulation. Checkpoints name the diffusion model and the autoencoder they
were trained on (paths relative to the checkpoint and weights fingerprints, see :mod:`ldae.checkpoints`);
inference loads them with :func:`ldae.checkpoints.load_representation`.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from ldae.checkpoints import (
    YSEM_STATS,
    UpstreamRef,
    attach_metadata,
    checkpoint_dir,
    load_latent_diffusion,
    load_representation,
    open_checkpoint,
    stage_metadata,
)
from ldae.config import get_dotted
from ldae.data.latents import read_latent_meta
from ldae.diffusion.ddim import ddim_invert, ddim_sample
from ldae.diffusion.pdae import guided_eps_fn, pdae_loss, run_guidance_scale
from ldae.distributed import is_main_process
from ldae.errors import CheckpointError, ConfigError
from ldae.io import write_json
from ldae.nets.fast_conv import use_fast_conv3d
from ldae.nets.semantic_encoder import build_semantic_encoder
from ldae.nets.weights import freeze, weights_fingerprint
from ldae.training.common import (
    make_datamodule,
    prepare_run,
    require_sections,
    resolve_precision,
    train,
)
from ldae.training.ema import EMA, EMACodeNorm, EMAStepMixin, adam_from_config

log = logging.getLogger(__name__)

STAGE = "representation"
MONITOR = "val/ssim_semantic"
SECTIONS = ("data", "model", "loss", "ema", "optim", "validation", "trainer")


class RepresentationModule(EMAStepMixin, pl.LightningModule):
    """Semantic encoder + gradient estimator trained on a frozen latent DDPM."""

    def __init__(self, cfg: dict, diffusion_checkpoint: str, diffusion: Any = None) -> None:
        """``diffusion``: the frozen latent DDPM already in memory (a :class:`ldae.checkpoints.LatentDiffusion`,
        e.g. the benchmark's random one); by default it is loaded from ``diffusion_checkpoint``."""
        super().__init__()
        self.cfg = cfg
        self.diffusion_checkpoint = str(diffusion_checkpoint)
        ldm = diffusion if diffusion is not None else load_latent_diffusion(diffusion_checkpoint)
        self._ldm = [ldm]  # a list: kept out of children/state_dict, never put in train mode
        self.diffusion_fingerprint = weights_fingerprint(ldm.unet)  # LDAE.load checks it
        self.schedule = ldm.schedule
        self.scale_factor = ldm.scale_factor
        self.latent_shape = list(ldm.latent_shape)
        try:  # the autoencoder the diffusion model names (found beside it, or where it was trained)
            self.autoencoder_checkpoint: str | None = str(ldm.find_autoencoder())
        except CheckpointError:
            self.autoencoder_checkpoint = None
        self.autoencoder_fingerprint = ldm.autoencoder_fingerprint
        # weights saved under checkpoints.REPRESENTATION_PREFIXES (EMA copies: what inference loads)
        self.encoder = build_semantic_encoder(cfg["model"]["semantic_encoder"])
        self.shift = ldm.unet.make_shift_decoder(self.encoder.emb_dim)
        decay, warmup = float(cfg["ema"]["decay"]), bool(cfg["ema"].get("warmup", False))
        self.ema_encoder = EMA(self.encoder, decay, warmup)
        self.ema_shift = EMA(self.shift, decay, warmup)
        self.gamma = float(cfg["loss"]["gamma"])
        self.repeats = int(cfg["loss"].get("repeats", 1))
        # optional linear read-out of the latent from y_sem (training only; see latent_readout_loss)
        self.readout_weight = float(cfg["loss"].get("latent_readout", 0.0) or 0.0)
        self.latent_readout = None
        if self.readout_weight > 0:
            self.latent_readout = torch.nn.Linear(self.encoder.emb_dim, math.prod(self.latent_shape), bias=False)
            torch.nn.init.zeros_(self.latent_readout.weight)  # starts at "explains nothing" (loss 1)
        self.out = Path(cfg["out"])
        self._autoencoder: list = []
        self._val: dict[str, list[torch.Tensor]] = {}
        self.code_norm = EMACodeNorm("ema_encoder.module.")  # the EMA encoder's CodeNorm statistics
        use_fast_conv3d(self)  # the gradient estimator's 3D weight gradients on CPUs without AVX-512 (issue 19)

    @property
    def unet(self) -> torch.nn.Module:
        return self._ldm[0].unet

    def on_fit_start(self) -> None:
        self.unet.to(self.device)
        freeze(self.unet)

    def on_validation_start(self) -> None:
        self.unet.to(self.device)

    # ---------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        z0 = batch["latent"] * self.scale_factor
        y = self.encoder(batch["image"])
        loss = pdae_loss(self.unet, self.shift, self.schedule, z0, y, self.gamma, repeats=self.repeats)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=z0.shape[0])
        if self.latent_readout is not None:
            readout = latent_readout_loss(self.latent_readout, y, z0)
            self.log("train/latent_readout", readout, on_step=True, on_epoch=True, batch_size=z0.shape[0])
            loss = loss + self.readout_weight * readout
        return loss

    def ema_pairs(self) -> list[tuple[EMA, torch.nn.Module]]:
        return [(self.ema_encoder, self.encoder), (self.ema_shift, self.shift)]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [*self.encoder.parameters(), *self.shift.parameters()]
        if self.latent_readout is not None:
            params += list(self.latent_readout.parameters())
        return adam_from_config(params, self.cfg["optim"])

    # ---------------------------------------------------------------- validation
    def autoencoder(self) -> torch.nn.Module:
        """The autoencoder the diffusion model was trained on (fingerprint checked): validation decodes
        through it."""
        if not self._autoencoder:
            self._autoencoder.append(self._ldm[0].load_autoencoder(self.device).net)
        return self._autoencoder[0]

    def on_validation_epoch_start(self) -> None:
        self.code_norm.calibrate(self, self.ema_encoder.module)  # validation and best.ckpt use the EMA encoder
        self._val = {"loss": [], "ssim_semantic": [], "ssim_encoded": []}

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        from ldae.metrics import ssim3d

        z0 = batch["latent"] * self.scale_factor
        x = batch["image"]
        seed = int(self.cfg.get("seed", 0)) * 1000 + batch_idx
        y = self.ema_encoder.module(x)
        gen = torch.Generator().manual_seed(seed)
        self._val["loss"].append(
            pdae_loss(self.unet, self.ema_shift.module, self.schedule, z0, y, self.gamma, gen).reshape(1)
        )
        steps = int(self.cfg["validation"]["ddim_steps"])
        eps_fn = guided_eps_fn(self.unet, self.ema_shift.module, self.schedule, y)
        # semantic-only (random z_T) at the run's guidance scale, as LDAE.semantic_only decodes it
        sampling_fn = guided_eps_fn(self.unet, self.ema_shift.module, self.schedule, y,
                                    run_guidance_scale(self.cfg, "representation config"))
        z_T = torch.randn(z0.shape, generator=gen).to(z0)
        semantic = ddim_sample(sampling_fn, z_T, self.schedule, steps)
        encoded = ddim_sample(eps_fn, ddim_invert(eps_fn, z0, self.schedule, steps), self.schedule, steps)
        ae = self.autoencoder()
        target = ae.decode(z0 / self.scale_factor).clamp(0, 1)
        vol_sem = ae.decode(semantic / self.scale_factor).clamp(0, 1)
        vol_enc = ae.decode(encoded / self.scale_factor).clamp(0, 1)
        self._val["ssim_semantic"].append(ssim3d(vol_sem, target))
        self._val["ssim_encoded"].append(ssim3d(vol_enc, target))
        if batch_idx == 0 and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            from ldae.viz import save_mosaic

            rows = [("input", x[0]), ("autoencoder", target[0]), ("LDAE semantic-only", vol_sem[0]),
                    ("LDAE encoded", vol_enc[0]), ("|encoded - AE|", (vol_enc[0] - target[0]).abs())]
            save_mosaic(self.out / "figures" / f"recon_epoch{self.current_epoch:03d}.png", rows,
                        title=f"epoch {self.current_epoch}: {steps} DDIM steps")

    def on_validation_epoch_end(self) -> None:
        for key, values in self._val.items():
            if values:
                value = torch.cat([v.reshape(-1).float().cpu() for v in values]).mean()
                self.log(f"val/{key}", value, prog_bar=key == "ssim_semantic", sync_dist=True)

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.code_norm.on_save_checkpoint(self, self.ema_encoder.module, checkpoint)
        where = checkpoint_dir(self.cfg)
        upstream = {"diffusion": UpstreamRef.to(self.diffusion_checkpoint, where, self.diffusion_fingerprint)}
        if self.autoencoder_checkpoint:
            upstream["autoencoder"] = UpstreamRef.to(self.autoencoder_checkpoint, where, self.autoencoder_fingerprint)
        attach_metadata(checkpoint, stage_metadata(
            self.cfg, STAGE, scale_factor=self.scale_factor, latent_shape=self.latent_shape,
            emb_dim=self.encoder.emb_dim, unet_config=dict(self.unet.config), upstream=upstream))


def latent_readout_loss(readout: torch.nn.Module, y_sem: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    """Fraction of the batch's latent variation that a linear map of y_sem leaves unexplained.

    With deviations from the batch means, ``ẑ = z0 − z̄0`` and ``ŷ = y_sem − ȳ``:
    ``mean‖ẑ − W ŷ‖² / mean‖ẑ‖²`` (1 for W = 0). Centring both sides makes the loss about how scans
    *differ*: the latents' mean (most of their magnitude, the same in every scan) needs no bias to be learnt
    first. Added to the PDAE loss with weight ``loss.latent_readout`` (0 = off, the paper's objective), it
    asks y_sem to carry the latent's directions of largest variation linearly, as a principal-component
    basis does. Why it exists: a gradient estimator given *fixed* features recovers about as much held-out
    denoising error from the ventricle-free part of the latents' principal components as from all of them
    (README, "Stage-3 levers"), so the PDAE loss alone gives y_sem little reason to keep a structure that
    explains 1.5 % of the latents' variance. W (``readout``, bias unused) is trained with the encoder and
    dropped after training.
    """
    flat = z0.flatten(1).float()
    target = flat - flat.mean(dim=0, keepdim=True)
    y = y_sem.float()
    pred = torch.nn.functional.linear(y - y.mean(dim=0, keepdim=True), readout.weight)
    return (pred - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def _validate(cfg: dict) -> None:
    require_sections(cfg, SECTIONS, STAGE, "RUN/latents/cohort_with_compressed_latent.csv")
    if not cfg.get("diffusion_checkpoint"):
        raise ConfigError("config key 'diffusion_checkpoint' is not set: pass --diffusion_checkpoint RUN/diffusion/checkpoints/best.ckpt")
    if not isinstance(get_dotted(cfg, "model.semantic_encoder"), dict):
        raise ConfigError("config section 'model.semantic_encoder' is missing")
    repeats = get_dotted(cfg, "loss.repeats", 1)  # absent in configs written before it existed
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"config key 'loss.repeats': expected an integer >= 1, got {repeats!r}")
    readout = get_dotted(cfg, "loss.latent_readout", 0.0)
    if readout is None:
        readout = 0.0
    if isinstance(readout, bool) or not isinstance(readout, (int, float)) or not math.isfinite(readout) or readout < 0:
        raise ConfigError(f"config key 'loss.latent_readout': expected a number >= 0, got {readout!r}")
    run_guidance_scale(cfg, "representation config")


def _image_geometry(module: RepresentationModule) -> tuple[Any, list[int]]:
    """Spacing and shape of the volumes the autoencoder was trained on (the encoder sees the same)."""
    ldm = module._ldm[0]
    data = open_checkpoint(ldm.find_autoencoder(), "autoencoder").config["data"]
    return data["spacing"], [int(s) for s in data["shape"]]


def fit(cfg: dict, resume: bool = False) -> Path:
    """Train stage 3; return ``out/checkpoints/best.ckpt`` (highest semantic-only validation SSIM)."""
    from ldae.data.datamodule import ImageLatentDataModule

    cfg = copy.deepcopy(cfg)
    _validate(cfg)
    cfg["trainer"]["precision"] = resolve_precision(cfg["trainer"])  # bf16 -> 32-true where it is emulated
    data = cfg["data"]
    meta = read_latent_meta(data["csv"])
    pl.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
    module = RepresentationModule(cfg, cfg["diffusion_checkpoint"])
    spacing, shape = _image_geometry(module)
    n_slices = int(cfg["model"]["semantic_encoder"]["num_slices"])
    if n_slices != shape[-1]:
        raise ConfigError(f"model.semantic_encoder.num_slices is {n_slices} but the volumes have {shape[-1]} "
                          f"axial slices (shape {shape})")
    datamodule = make_datamodule(ImageLatentDataModule, cfg, spacing=spacing, shape=shape,
                                 latent_shape=meta["latent_shape"], cache=bool(data.get("cache", True)))
    datamodule.setup("fit")  # reads every latent: a bad NPZ fails here, before a run folder is created
    out, resume_ckpt = prepare_run(cfg, resume)
    best = train(module, datamodule, cfg, out, resume_ckpt, MONITOR, "max")
    if is_main_process():
        save_ysem_stats(best, datamodule, out / "checkpoints" / YSEM_STATS)
    return best


@torch.no_grad()
def save_ysem_stats(best: Path, datamodule: Any, path: Path) -> Path:
    """Mean and std of the (EMA) encoder's y_sem over the training split, for manipulation (with the
    encoder's weights fingerprint, so that statistics of another checkpoint are refused)."""
    encoder, _ = load_representation(best)
    ys = []
    for batch in datamodule.loader("train", False, datamodule.eval_batch_size):
        ys.append(encoder(batch["image"]))
    y = torch.cat(ys).double()
    std = y.std(dim=0, unbiased=False).clamp_min(1e-8) if len(y) > 1 else torch.ones(y.shape[1], dtype=y.dtype)
    return write_json(path, {"mean": y.mean(dim=0).tolist(), "std": std.tolist(), "n": int(len(y)),
                             "checkpoint": str(best), "encoder_fingerprint": weights_fingerprint(encoder)})

