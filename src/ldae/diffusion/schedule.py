"""The DDPM noise schedule: betas, ᾱ, SNR, forward noising, and the PDAE coefficients.

Notation (0-based timesteps t = 0..T-1; t = 0 is the *first* noising step, so the clean data sits one
level before it, with ᾱ = 1):

    α_t = 1 - β_t,      ᾱ_t = Π_{s<=t} α_s,      ᾱ_{-1} = 1,
    z_t = √ᾱ_t · z_0 + √(1-ᾱ_t) · ε,              SNR(t) = ᾱ_t / (1-ᾱ_t).

All tables are float64 on the CPU; per-batch values are gathered with :meth:`NoiseSchedule.gather` and
cast to the dtype/device of the tensor they multiply, so that fp32/bf16 models still get coefficients
computed in double precision.
"""

from __future__ import annotations

import torch

from ldae.errors import ConfigError

Tensor = torch.Tensor


class NoiseSchedule:
    """Linear-β DDPM schedule (Ho et al. 2020): β_t evenly spaced from ``beta_start`` to ``beta_end``.

    Args:
        T: number of diffusion steps (1000 in the paper).
        beta_start: β of the first step (1e-4).
        beta_end: β of the last step (2e-2).
    """

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> None:
        if int(T) < 2:
            raise ConfigError(f"diffusion.timesteps must be >= 2, got {T}")
        if not 0.0 < float(beta_start) <= float(beta_end) < 1.0:
            raise ConfigError(
                f"diffusion betas must satisfy 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}"
            )
        self.T = int(T)
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.betas = torch.linspace(self.beta_start, self.beta_end, self.T, dtype=torch.float64)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        #: ᾱ_{t-1}, with ᾱ_{-1} = 1 (the clean level)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        #: β̃_t = β_t (1-ᾱ_{t-1}) / (1-ᾱ_t), the variance of q(z_{t-1} | z_t, z_0)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    def __repr__(self) -> str:
        return f"NoiseSchedule(T={self.T}, beta_start={self.beta_start:g}, beta_end={self.beta_end:g})"

    @classmethod
    def from_config(cls, cfg: dict) -> NoiseSchedule:
        """Build from a config's ``diffusion`` section (keys ``timesteps``, ``beta_start``, ``beta_end``)."""
        known = {"timesteps", "beta_start", "beta_end"}
        unknown = set(cfg) - known
        if unknown:
            raise ConfigError(f"unknown key(s) in config section 'diffusion': {', '.join(sorted(unknown))}")
        return cls(cfg.get("timesteps", 1000), cfg.get("beta_start", 1e-4), cfg.get("beta_end", 2e-2))

    # ------------------------------------------------------------------ per-batch values
    def _index(self, t: Tensor | int) -> Tensor:
        t = torch.as_tensor(t).detach().to("cpu", torch.long)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.T):
            raise IndexError(f"timestep out of range [0, {self.T - 1}]: {t.tolist()}")
        return t

    def gather(self, table: Tensor, t: Tensor | int, like: Tensor | None = None) -> Tensor:
        """``table[t]`` for a batch of timesteps; with ``like`` (shape ``(B, ...)``) the result is shaped
        ``(B, 1, ..., 1)`` in ``like``'s dtype and device, ready to broadcast. Otherwise float64 on CPU."""
        values = table[self._index(t)]
        if like is None:
            return values
        values = values.reshape(-1, *([1] * (like.ndim - 1)))
        return values.to(device=like.device, dtype=like.dtype)

    def snr(self, t: Tensor | int) -> Tensor:
        """Signal-to-noise ratio ᾱ_t / (1-ᾱ_t) (float64)."""
        a = self.alphas_cumprod[self._index(t)]
        return a / (1.0 - a)

    def q_sample(self, z0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Forward noising z_t = √ᾱ_t z_0 + √(1-ᾱ_t) ε (``t`` has one entry per batch item)."""
        a = self.gather(self.alphas_cumprod, t, like=z0)
        return a.sqrt() * z0 + (1.0 - a).sqrt() * noise

    def predict_z0(self, z_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """The z_0 implied by a noise prediction: (z_t - √(1-ᾱ_t) ε) / √ᾱ_t."""
        a = self.gather(self.alphas_cumprod, t, like=z_t)
        return (z_t - (1.0 - a).sqrt() * eps) / a.sqrt()

    # ------------------------------------------------------------------ PDAE pieces (stage 3)
    def pdae_shift_coef(self, t: Tensor | int) -> Tensor:
        """Coefficient k_t that turns the PDAE mean shift into ε-space (float64).

        PDAE shifts the reverse-process mean by the posterior variance times a learned gradient G:
        μ̂ = μ_θ(z_t, t) + Σ_t · G with Σ_t = β̃_t = β_t (1-ᾱ_{t-1}) / (1-ᾱ_t). In ε-form the DDPM mean is
        μ(z_t, ε) = (z_t - β_t / √(1-ᾱ_t) · ε) / √α_t, which is affine in ε with slope -β_t / (√α_t √(1-ᾱ_t)).
        Asking μ(z_t, ε̂) = μ(z_t, ε_θ) + β̃_t G therefore gives ε̂ = ε_θ - k_t G with

            k_t = (√α_t √(1-ᾱ_t) / β_t) · β̃_t = √α_t (1-ᾱ_{t-1}) / √(1-ᾱ_t),

        and the training loss ‖ε - ε_θ(z_t, t) + k_t G_ψ(z_t, y, t)‖².
        """
        i = self._index(t)
        return self.alphas[i].sqrt() * (1.0 - self.alphas_cumprod_prev[i]) / (1.0 - self.alphas_cumprod[i]).sqrt()

    def pdae_weight(self, t: Tensor | int, gamma: float = 0.1) -> Tensor:
        """PDAE loss weight λ_t = SNR^γ / (1 + SNR) (float64).

        PDAE weights each timestep by (1/(1+SNR))^(1-γ) · (SNR/(1+SNR))^γ, small at both ends: nearly
        clean steps (little left for the semantic gradient to explain) and pure-noise steps. The two
        factors share the denominator (1+SNR)^((1-γ)+γ) = 1+SNR, so λ_t = SNR^γ / (1+SNR); γ = 0.1.
        """
        snr = self.snr(t)
        return snr.pow(float(gamma)) / (1.0 + snr)
