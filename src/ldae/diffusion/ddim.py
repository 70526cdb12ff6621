"""DDIM sampling and inversion (Song et al. 2021) for any ε-prediction model.

One update from noise level ᾱ_t to level ᾱ_s (the paper's equation 2)::

    ẑ_0 = (z_t - √(1-ᾱ_t) ε) / √ᾱ_t
    z_s = √ᾱ_s ẑ_0 + √(1-ᾱ_s-σ²) ε + σ n,   σ = η √((1-ᾱ_s)/(1-ᾱ_t)) √(1-ᾱ_t/ᾱ_s),   n ~ N(0, I)

Sampling walks the timesteps of :func:`ddim_timesteps` downwards and ends at the clean level (ᾱ = 1);
inversion (η = 0) walks the same levels upwards from the clean level, evaluating ε at the level it
leaves (first-order accurate, so round trips converge linearly in the step size). Predicted latents are
not clamped unless ``clip`` is given (latents are not bounded to [-1, 1]).

The published LDAE code samples differently ("ddimN", inherited from PDAE), and
:func:`official_ddim_sample` / :func:`official_ddim_invert` reproduce it to compare results one to one:
its N steps walk the N+1 levels ``int(linspace(0, T−1, N+1))`` (ddim100: 0, 9, 19, ..., 989, 999), the clean
data is identified with level t = 0 (ᾱ_0 = 1 − β_0 rather than 1), and ẑ_0 is clamped to [−1, 1] at every
step of sampling **and** inversion (the clamp breaks the exactness of inversion for latents outside
[−1, 1]; ldae's DDIM, the default, never clamps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import numpy as np
import torch

from ldae.diffusion.schedule import NoiseSchedule
from ldae.errors import ConfigError

Tensor = torch.Tensor
EpsFn = Callable[[Tensor, Tensor], Tensor]
_T = TypeVar("_T")


def ddim_timesteps(steps: int, T: int = 1000) -> Tensor:
    """``steps`` timesteps evenly spaced over [0, T-1], **ascending**, always containing T-1 (and 0 when
    ``steps`` >= 2); ``steps = T`` gives every timestep. Sampling visits them in reverse order."""
    steps, T = int(steps), int(T)
    if not 1 <= steps <= T:
        raise ConfigError(f"number of DDIM steps must be between 1 and {T}, got {steps}")
    if steps == 1:
        return torch.tensor([T - 1], dtype=torch.long)
    ts = np.round(np.linspace(0, T - 1, steps)).astype(np.int64)
    return torch.from_numpy(ts)


def ddim_step(
    z_t: Tensor,
    eps: Tensor,
    alpha_t: float,
    alpha_s: float,
    eta: float = 0.0,
    noise: Tensor | None = None,
    clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Move ``z_t`` from level ᾱ_t to level ᾱ_s (s before t for sampling, after t for inversion).

    Args:
        z_t: current latents ``(B, ...)``.
        eps: the model's noise prediction at ``z_t``.
        alpha_t: ᾱ of the current level.
        alpha_s: ᾱ of the target level (1.0 = clean).
        eta: stochasticity (0 = deterministic DDIM, 1 = DDPM-like); only meaningful when sampling.
        noise: standard normal noise for η > 0.
        clip: clamp ẑ_0 to [-clip, clip] (and re-derive ε from it); None = no clamping.

    Returns:
        ``(z_s, ẑ_0)``.
    """
    z0 = (z_t - (1.0 - alpha_t) ** 0.5 * eps) / alpha_t**0.5
    if clip is not None:
        z0 = z0.clamp(-float(clip), float(clip))
        eps = (z_t - alpha_t**0.5 * z0) / (1.0 - alpha_t) ** 0.5
    sigma = 0.0
    if eta > 0.0 and alpha_s > alpha_t:
        sigma = eta * ((1.0 - alpha_s) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_s)) ** 0.5
    z_s = alpha_s**0.5 * z0 + max(1.0 - alpha_s - sigma**2, 0.0) ** 0.5 * eps
    if sigma > 0.0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs a noise tensor")
        z_s = z_s + sigma * noise
    return z_s, z0


def _progress(items: Iterable[_T], total: int, description: str, enabled: bool) -> Iterable[_T]:
    if not enabled:
        return items
    from rich.progress import track

    return track(items, total=total, description=description, transient=True)


@torch.no_grad()
def ddim_sample(
    eps_fn: EpsFn,
    z_T: Tensor,
    schedule: NoiseSchedule,
    steps: int,
    eta: float = 0.0,
    clip: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Denoise ``z_T`` (level t = T-1) to the clean level in ``steps`` model evaluations.

    Args:
        eps_fn: ``eps_fn(z_t, t_batch) -> ε`` with ``t_batch`` a long tensor ``(B,)`` on ``z_T``'s device.
        z_T: starting noise ``(B, ...)``.
        schedule: the noise schedule the model was trained with.
        steps: number of DDIM steps (1..T); timesteps from :func:`ddim_timesteps`.
        eta: 0 for deterministic DDIM; > 0 adds noise drawn from ``generator``.
        clip: optional clamp of the predicted clean latents (off by default).
        generator: random generator for η > 0 (on ``z_T``'s device).
        progress: show a progress bar.
    """
    ts = ddim_timesteps(steps, schedule.T).tolist()
    acp = schedule.alphas_cumprod
    z = z_T
    for i in _progress(reversed(range(len(ts))), len(ts), "DDIM sampling", progress):
        t = ts[i]
        alpha_t = float(acp[t])
        alpha_s = float(acp[ts[i - 1]]) if i > 0 else 1.0
        eps = eps_fn(z, torch.full((z.shape[0],), t, dtype=torch.long, device=z.device))
        noise = None
        if eta > 0.0 and i > 0:
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        z, _ = ddim_step(z, eps, alpha_t, alpha_s, eta=eta, noise=noise, clip=clip)
    return z


@torch.no_grad()
def ddim_invert(
    eps_fn: EpsFn,
    z_0: Tensor,
    schedule: NoiseSchedule,
    steps: int,
    progress: bool = False,
) -> Tensor:
    """Deterministically encode clean latents ``z_0`` to z_T (level T-1): the reverse of
    :func:`ddim_sample` with η = 0 over the same levels, ``steps`` model evaluations.

    The step leaving level t_i evaluates ε(z, t_i); the first step leaves the clean level and evaluates
    ε at t = 0 (the nearest trained timestep). Only indices inside the timestep list are used.
    """
    ts = ddim_timesteps(steps, schedule.T).tolist()
    acp = schedule.alphas_cumprod
    z = z_0
    alpha_t, t_eval = 1.0, 0
    for i in _progress(range(len(ts)), len(ts), "DDIM inversion", progress):
        eps = eps_fn(z, torch.full((z.shape[0],), t_eval, dtype=torch.long, device=z.device))
        alpha_s = float(acp[ts[i]])
        z, _ = ddim_step(z, eps, alpha_t, alpha_s)
        alpha_t, t_eval = alpha_s, ts[i]
    return z


# ----------------------------------------------------------------------------- the official sampler

#: ``ldae``: this module's DDIM (reaches T−1 and the clean level, no clamp); ``official``: the published
#: LDAE code's "ddimN" (:func:`official_ddim_sample`), to compare results one to one with it
SAMPLERS = ("ldae", "official")


def official_timesteps(steps: int, T: int = 1000) -> Tensor:
    """The levels of the published LDAE code's "ddimN" (from PDAE), ascending: the distinct
    ``int(s)`` (truncated) of ``linspace(0, T−1, steps + 1)``. For ``steps`` <= T−1 these are ``steps + 1``
    levels from t = 0 to t = T−1 (ddim100: 0, 9, 19, ..., 989, 999); ``steps`` model evaluations walk
    between them, and the clean data is identified with level t = 0 (ᾱ_0 = 1 − β_0, not 1)."""
    steps, T = int(steps), int(T)
    if not 1 <= steps <= T:
        raise ConfigError(f"number of DDIM steps must be between 1 and {T}, got {steps}")
    levels = sorted({int(s) for s in np.linspace(0, T - 1, steps + 1)})
    return torch.tensor(levels, dtype=torch.long)


@torch.no_grad()
def official_ddim_sample(eps_fn: EpsFn, z_T: Tensor, schedule: NoiseSchedule, steps: int,
                         progress: bool = False) -> Tensor:
    """Deterministic DDIM as the published LDAE code runs it: from level t = T−1 down the levels of
    :func:`official_timesteps`, each step ``ddim_step(clip=1)`` (ẑ_0 clamped to [−1, 1], ε re-derived from
    it), the last step landing on level t = 0 (ᾱ_0), which is returned as the sample."""
    ts = official_timesteps(steps, schedule.T).tolist()
    acp = schedule.alphas_cumprod
    z = z_T
    for i in _progress(reversed(range(1, len(ts))), len(ts) - 1, "DDIM sampling (official)", progress):
        eps = eps_fn(z, torch.full((z.shape[0],), ts[i], dtype=torch.long, device=z.device))
        z, _ = ddim_step(z, eps, float(acp[ts[i]]), float(acp[ts[i - 1]]), clip=1.0)
    return z


@torch.no_grad()
def official_ddim_invert(eps_fn: EpsFn, z_0: Tensor, schedule: NoiseSchedule, steps: int,
                         progress: bool = False) -> Tensor:
    """DDIM inversion as the published LDAE code runs it: ``z_0`` is taken as level t = 0, each step
    evaluates ε at the level it leaves and moves up one level of :func:`official_timesteps` with the same
    [−1, 1] clamp of ẑ_0, ending at t = T−1."""
    ts = official_timesteps(steps, schedule.T).tolist()
    acp = schedule.alphas_cumprod
    z = z_0
    for i in _progress(range(len(ts) - 1), len(ts) - 1, "DDIM inversion (official)", progress):
        eps = eps_fn(z, torch.full((z.shape[0],), ts[i], dtype=torch.long, device=z.device))
        z, _ = ddim_step(z, eps, float(acp[ts[i]]), float(acp[ts[i + 1]]), clip=1.0)
    return z


def sampler_functions(sampler: str) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """``(sample, invert)`` of a sampler name (:data:`SAMPLERS`); both take ``(eps_fn, z, schedule,
    steps)``. ConfigError naming the value otherwise."""
    if sampler == "ldae":
        return ddim_sample, ddim_invert
    if sampler == "official":
        return official_ddim_sample, official_ddim_invert
    raise ConfigError(f"unknown DDIM sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
