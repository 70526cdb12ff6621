"""Stage 1: train MONAI's 3D ``AutoencoderKL`` with L1 + KL + patch-adversarial (+ perceptual) losses.

Two optimizers (generator = autoencoder, discriminator) need Lightning's manual optimization, so this
module implements gradient accumulation (``optim.accumulate_grad_batches``) and norm clipping
(``optim.gradient_clip_val``) itself. Each network's backward runs while the other network's
parameters are frozen (``requires_grad=False``), so no gradient leaks between them. The adversary
switches on after ``loss.adversarial_warmup_epochs``. Mixed precision is Lightning's
``trainer.precision`` (``bf16-mixed`` autocast on CPU and bf16-capable GPUs; otherwise 32-true).

Validation reconstructs the val split from the posterior mean, logs ``val/ssim`` (monitored for
``best.ckpt``), ``val/psnr`` and ``val/mse`` on reconstructions clipped to [0, 1], and saves an
input / reconstruction / |error| mosaic to ``out/figures/`` each time.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import AutoencoderKL

from ldae.checkpoints import attach_metadata, stage_metadata
from ldae.errors import ConfigError
from ldae.metrics import reconstruction_metrics
from ldae.nets.autoencoder import (
    build_autoencoder,
    build_discriminator,
    discriminator_logits,
    kl_loss,
    l1_loss,
    latent_shape,
)
from ldae.nets.fast_conv import use_fast_conv3d
from ldae.nets.perceptual import build_perceptual_loss
from ldae.training.common import (
    make_datamodule,
    prepare_run,
    require_sections,
    resolve_precision,
    train,
)

log = logging.getLogger(__name__)

STAGE = "autoencoder"
MONITOR = "val/ssim"


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every parameter of ``module`` (flags restored after),
    so that a backward pass through it deposits no gradient in it."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


class AutoencoderModule(pl.LightningModule):
    """Generator (AutoencoderKL) + PatchDiscriminator trained adversarially; see module docstring.

    ``perceptual`` is kept outside the registered submodules: it is frozen, stays in eval mode, and is
    not saved in checkpoints.
    """

    def __init__(self, cfg: dict, perceptual: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.cfg = copy.deepcopy(cfg)
        self.autoencoder: AutoencoderKL = build_autoencoder(cfg["model"])  # weights: checkpoints.AUTOENCODER_PREFIX
        self.discriminator = build_discriminator(cfg["discriminator"])
        self.adversarial = PatchAdversarialLoss(criterion="least_squares")
        self._perceptual = [perceptual] if perceptual is not None else []  # a list hides it from nn.Module
        loss = cfg["loss"]
        self.w_l1 = float(loss["l1_weight"])
        self.w_kl = float(loss["kl_weight"])
        self.w_adv = float(loss["adversarial_weight"])
        self.w_perceptual = float(loss["perceptual_weight"])
        self.warmup_epochs = int(loss.get("adversarial_warmup_epochs", 0) or 0)
        optim = cfg["optim"]
        self.accumulate = int(optim.get("accumulate_grad_batches", 1) or 1)
        self.clip_val = optim.get("gradient_clip_val")
        self.max_skips = int(optim.get("max_consecutive_skips", 10))
        self._skips = {"generator": 0, "discriminator": 0}
        self._skipped_total = {"generator": 0, "discriminator": 0}
        self.out = Path(cfg["out"]) if cfg.get("out") else None
        self._mosaic_saved = False
        use_fast_conv3d(self)  # CPUs without AVX-512: 3D weight gradients as forward convolutions (issue 19)

    # ------------------------------------------------------------------ losses (also used by tests)
    @property
    def perceptual(self) -> torch.nn.Module | None:
        return self._perceptual[0] if self._perceptual else None

    def adversary_active(self) -> bool:
        """True once the warm-up epochs are over (and the adversarial weight is positive)."""
        return self.w_adv > 0 and self.current_epoch >= self.warmup_epochs

    def _backward(self, loss: torch.Tensor) -> None:
        if self._trainer is not None:
            self.manual_backward(loss)
        else:  # unit tests drive the module without a Trainer
            loss.backward()

    def generator_backward(
        self, x: torch.Tensor, adversarial: bool, scale: float = 1.0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward the autoencoder, backpropagate the weighted generator loss (times ``scale``) into the
        autoencoder only; return the detached reconstruction and the loss terms."""
        with frozen(self.discriminator):
            recon, z_mu, z_sigma = self.autoencoder(x)
            terms = {"l1": l1_loss(recon, x), "kl": kl_loss(z_mu, z_sigma)}
            total = self.w_l1 * terms["l1"] + self.w_kl * terms["kl"]
            if self.perceptual is not None and self.w_perceptual > 0:
                terms["perceptual"] = self.perceptual(recon.float(), x.float())
                total = total + self.w_perceptual * terms["perceptual"]
            if adversarial:
                logits = discriminator_logits(self.discriminator, recon)
                terms["adv_g"] = self.adversarial(logits, target_is_real=True, for_discriminator=False)
                total = total + self.w_adv * terms["adv_g"]
            terms["loss_g"] = total
            self._backward(total * scale)
        return recon.detach(), {k: v.detach() for k, v in terms.items()}

    def discriminator_backward(self, x: torch.Tensor, recon: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Backpropagate the least-squares patch loss (real -> 1, reconstruction -> 0, averaged, times the
        adversarial weight and ``scale``) into the discriminator only; return the unweighted loss."""
        with frozen(self.autoencoder):
            fake = discriminator_logits(self.discriminator, recon.detach())
            real = discriminator_logits(self.discriminator, x)
            loss = 0.5 * (
                self.adversarial(fake, target_is_real=False, for_discriminator=True)
                + self.adversarial(real, target_is_real=True, for_discriminator=True)
            )
            self._backward(self.w_adv * loss * scale)
        return loss.detach()

    # ------------------------------------------------------------------ Lightning hooks
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Adam for each network (learning rates scaled per epoch in :meth:`on_train_epoch_start`)."""
        optim = self.cfg["optim"]
        betas = tuple(optim.get("betas", (0.9, 0.999)))
        opt_g = torch.optim.Adam(self.autoencoder.parameters(), lr=float(optim["lr_generator"]), betas=betas)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=float(optim["lr_discriminator"]), betas=betas)
        return [opt_g, opt_d]

    def on_train_epoch_start(self) -> None:
        """Set both learning rates from the epoch (stateless, so a resumed run continues the schedule)."""
        optim = self.cfg["optim"]
        factor = lr_factor(self.current_epoch, int(self.cfg["trainer"].get("max_epochs") or 1),
                           str(optim.get("lr_schedule", "constant")), float(optim.get("lr_min_factor", 0.0)))
        for opt, key in zip(self.optimizers(), ("lr_generator", "lr_discriminator")):
            for group in opt.param_groups:
                group["lr"] = float(optim[key]) * factor
        self.log("train/lr_generator", float(optim["lr_generator"]) * factor, on_step=False, on_epoch=True)

    def on_fit_start(self) -> None:
        if self.perceptual is not None:
            self.perceptual.to(self.device).eval()

    def _optimizer_step(self, optimizer: Any, name: str) -> None:
        """Clip (norm) the accumulated gradients of one optimizer, step it and clear its gradients.

        A step whose gradients hold NaN/inf is skipped (as AMP's GradScaler does) so that one bad batch
        cannot poison the weights; ``optim.max_consecutive_skips`` skips in a row stop training.
        """
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
        if finite:
            self._skips[name] = 0
            if self.clip_val:
                self.clip_gradients(optimizer, gradient_clip_val=float(self.clip_val),
                                    gradient_clip_algorithm="norm")
            optimizer.step()
        else:
            self._skips[name] += 1
            self._skipped_total[name] += 1
            log.warning("%s step %d skipped: non-finite gradients (%d in a row)", name, self.global_step,
                        self._skips[name])
            if self._skips[name] > self.max_skips:
                raise FloatingPointError(
                    f"{name}: {self._skips[name]} consecutive optimizer steps with non-finite gradients; "
                    "lower the learning rates or use trainer.precision 32-true"
                )
        optimizer.zero_grad(set_to_none=True)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        x = batch["image"]
        scale = 1.0 / self.accumulate
        adversarial = self.adversary_active()
        recon, terms = self.generator_backward(x, adversarial, scale)
        if adversarial:
            terms["loss_d"] = self.discriminator_backward(x, recon, scale)
        if (batch_idx + 1) % self.accumulate == 0 or self.trainer.is_last_batch:
            self._optimizer_step(opt_g, "generator")
            if adversarial:
                self._optimizer_step(opt_d, "discriminator")
            else:
                opt_d.zero_grad(set_to_none=True)
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, on_step=True, on_epoch=True,
                      batch_size=x.shape[0])
        self.log("train/adversary_on", float(adversarial), on_step=False, on_epoch=True, batch_size=x.shape[0])
        self.log("train/skipped_steps", float(sum(self._skipped_total.values())), on_step=False, on_epoch=True,
                 reduce_fx="max", batch_size=x.shape[0])

    def on_validation_epoch_start(self) -> None:
        self._mosaic_saved = False

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        with torch.autocast(device_type=self.device.type, enabled=False):
            recon = self.autoencoder.reconstruct(x.float()).float().clamp(0.0, 1.0)
        metrics = reconstruction_metrics(recon, x.float())
        self.log_dict({f"val/{k}": v.mean() for k, v in metrics.items()}, on_epoch=True,
                      batch_size=x.shape[0], prog_bar=True, sync_dist=True)
        if (not self._mosaic_saved and not self.trainer.sanity_checking and self.out is not None
                and self.trainer.is_global_zero):
            self._save_mosaic(x[0], recon[0], float(metrics["ssim"][0]))
            self._mosaic_saved = True

    def _save_mosaic(self, x: torch.Tensor, recon: torch.Tensor, ssim: float) -> None:
        from ldae.viz import save_mosaic

        path = self.out / "figures" / f"val_epoch{self.current_epoch:03d}.png"
        save_mosaic(path, [("input", x), ("reconstruction", recon), ("|error|", (recon - x).abs())],
                    title=f"epoch {self.current_epoch}: SSIM {ssim:.3f}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        shape = list(latent_shape(self.cfg["model"], self.cfg["data"]["shape"]))
        attach_metadata(checkpoint, stage_metadata(self.cfg, STAGE, latent_shape=shape))


def lr_factor(epoch: int, max_epochs: int, schedule: str = "constant", min_factor: float = 0.0) -> float:
    """Learning-rate multiplier for ``epoch``: 1 (``constant``) or a half cosine from 1 at epoch 0 down to
    ``min_factor`` at ``max_epochs`` (``cosine``; a short run then ends on small, stable GAN steps)."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(max(epoch / max(max_epochs, 1), 0.0), 1.0)
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"config key 'optim.lr_schedule' is '{schedule}' (choose constant or cosine)")


# ---------------------------------------------------------------------- entry points


def _validate(cfg: dict) -> None:
    require_sections(cfg, ("data", "model", "discriminator", "loss", "optim", "trainer"), STAGE)
    for key in ("accumulate_grad_batches", "gradient_clip_val"):
        if key in cfg["trainer"]:
            raise ConfigError(f"config key 'trainer.{key}' is not supported by the two-optimizer "
                              f"autoencoder stage: use 'optim.{key}'")
    latent_shape(cfg["model"], cfg["data"]["shape"])  # divisibility check
    lr_factor(0, 1, str(cfg["optim"].get("lr_schedule", "constant")))  # schedule name check


def fit(cfg: dict, resume: bool = False) -> Path:
    """Train stage 1 from a resolved config; return ``out/checkpoints/best.ckpt`` (best ``val/ssim``).

    The perceptual loss status ("enabled (...)" / "disabled (reason)") is written into the saved
    config as ``loss.perceptual_status`` and thus into every checkpoint's metadata.
    """
    from ldae.data.datamodule import VolumeDataModule

    cfg = copy.deepcopy(cfg)
    _validate(cfg)
    cfg["trainer"]["precision"] = resolve_precision(cfg["trainer"])
    if cfg["trainer"].get("strategy") == "ddp":  # each of the two backward passes leaves one network unused
        cfg["trainer"]["strategy"] = "ddp_find_unused_parameters_true"
    perceptual = build_perceptual_loss(cfg["loss"])
    cfg["loss"]["perceptual_status"] = perceptual.status
    data = cfg["data"]
    datamodule = make_datamodule(VolumeDataModule, cfg, spacing=data["spacing"], shape=data["shape"],
                                 cache=bool(data.get("cache", False)))
    out, resume_ckpt = prepare_run(cfg, resume)
    pl.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
    module = AutoencoderModule(cfg, perceptual=perceptual.loss)
    return train(module, datamodule, cfg, out, resume_ckpt, MONITOR, "max")

