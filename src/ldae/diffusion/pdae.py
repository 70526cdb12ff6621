"""PDAE pieces shared by training (stage 3) and inference (``ldae.model``).

Training (see :meth:`NoiseSchedule.pdae_shift_coef` and :meth:`NoiseSchedule.pdae_weight` for the
derivations): with ε_θ the frozen unconditional model and G_ψ the gradient estimator,

    ε̂_train = ε_θ(z_t, t) − k_t · G_ψ(z_t, y, t),     loss = E_t[ λ_t ‖ε − ε̂_train‖² ]

Inference (DDIM, classifier-guidance form, G_ψ ≈ ∇ log p(y | z_t)):

    ε̂ = ε_θ(z_t, t) − s · √(1−ᾱ_t) · G_ψ(z_t, y, t)

with the guidance scale s = 1 in the paper. s > 1 samples from p(z) p(y | z)^s (the classifier scale of
Dhariwal & Nichol 2021, §4.3): an L2-trained G_ψ estimates the *average* shift over the scans that share
a code and so under-states it wherever y_sem leaves the scan uncertain (high noise); s compensates, at the
price of a decoding that departs further from the unconditional model's.

Both use ONE encoder pass of the frozen UNet per evaluation; its skips feed the UNet's own decoder and
the shift decoder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldae.diffusion.schedule import NoiseSchedule
from ldae.nets.unet import LatentUNet, ShiftDecoder

Tensor = torch.Tensor


def unet_and_shift(
    unet: LatentUNet, shift: ShiftDecoder, z_t: Tensor, t: Tensor, y_sem: Tensor, grad_unet: bool = False
) -> tuple[Tensor, Tensor]:
    """``(ε_θ, G_ψ)`` with the frozen UNet's encoder run once; gradients flow only into ``shift`` and
    ``y_sem`` unless ``grad_unet``."""
    with torch.set_grad_enabled(grad_unet and torch.is_grad_enabled()):
        h, skips, emb = unet.encode(z_t, t)
        eps = unet.decode(h, skips, emb)
    return eps, shift(skips, t, y_sem, emb)


def pdae_loss(
    unet: LatentUNet,
    shift: ShiftDecoder,
    schedule: NoiseSchedule,
    z0: Tensor,
    y_sem: Tensor,
    gamma: float = 0.1,
    generator: torch.Generator | None = None,
    repeats: int = 1,
) -> Tensor:
    """Mean over the batch of λ_t · mean‖ε − (ε_θ − k_t G_ψ)‖² at uniformly drawn timesteps.

    ``repeats``: timesteps (and noises) drawn per sample, all with the same ``y_sem``. The semantic
    encoder (the costly part of a step at small latent sizes) then runs once for several loss terms: a
    lower-variance gradient for it at the price of ``repeats`` passes of the small latent networks.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if repeats > 1:
        z0, y_sem = z0.repeat_interleave(repeats, dim=0), y_sem.repeat_interleave(repeats, dim=0)
    b = z0.shape[0]
    if generator is None:
        t = torch.randint(0, schedule.T, (b,), device=z0.device)
        noise = torch.randn_like(z0)
    else:
        t = torch.randint(0, schedule.T, (b,), generator=generator).to(z0.device)
        noise = torch.randn(z0.shape, generator=generator, dtype=z0.dtype).to(z0.device)
    z_t = schedule.q_sample(z0, t, noise)
    eps, g = unet_and_shift(unet, shift, z_t, t, y_sem)
    k = schedule.pdae_shift_coef(t).to(z0.device, z0.dtype).reshape(-1, *([1] * (z0.ndim - 1)))
    lam = schedule.pdae_weight(t, gamma).to(z0.device, torch.float32)
    per_sample = ((noise - (eps - k * g)).float() ** 2).flatten(1).mean(dim=1)
    return (lam * per_sample).mean()


def check_guidance_scale(scale: object, where: str) -> float:
    """``scale`` as a float; ConfigError naming ``where`` unless it is a finite number > 0."""
    import math

    from ldae.errors import ConfigError

    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ConfigError(f"{where}: expected a guidance scale > 0 (1 = the paper's decoding), got {scale!r}")
    return float(scale)


def run_guidance_scale(cfg: dict, source: str) -> float:
    """A stage-3 config's ``decoding.guidance_scale`` (1 when absent: runs written before it existed);
    ConfigError naming ``source`` when it is not a number > 0."""
    value = (cfg.get("decoding") or {}).get("guidance_scale", 1.0)
    return check_guidance_scale(1.0 if value is None else value, f"{source}: config key 'decoding.guidance_scale'")


def guided_eps_fn(
    unet: LatentUNet, shift: ShiftDecoder | None, schedule: NoiseSchedule, y_sem: Tensor | None,
    scale: float = 1.0,
) -> Callable[[Tensor, Tensor], Tensor]:
    """``eps_fn(z_t, t)`` for DDIM sampling/inversion: ε̂ = ε_θ − s √(1−ᾱ_t) G_ψ(·, y_sem) with the
    guidance scale s = ``scale`` (1: the paper's); the plain ε_θ when ``shift`` or ``y_sem`` is None
    (LDDIM, no semantics)."""
    scale = check_guidance_scale(scale, "guidance scale")

    @torch.no_grad()
    def eps_fn(z_t: Tensor, t: Tensor) -> Tensor:
        if shift is None or y_sem is None:
            return unet(z_t, t)
        eps, g = unet_and_shift(unet, shift, z_t, t, y_sem)
        k = (1.0 - schedule.gather(schedule.alphas_cumprod, t, like=z_t)).sqrt()
        return eps - (scale * k) * g

    return eps_fn
