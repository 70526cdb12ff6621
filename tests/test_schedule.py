"""Noise schedule against closed forms; q_sample statistics; PDAE coefficients against the posterior mean."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldae.diffusion.schedule import NoiseSchedule
from ldae.errors import ConfigError


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule(1000, 1e-4, 2e-2)


def test_linear_betas_and_cumprod_closed_form(sched):
    t = np.arange(1000)
    beta = 1e-4 + (2e-2 - 1e-4) * t / 999  # closed form of a linear schedule
    assert sched.betas.dtype == torch.float64
    np.testing.assert_allclose(sched.betas.numpy(), beta, rtol=0, atol=1e-15)
    # ᾱ_t = exp(Σ log(1 - β_s)), computed independently with Python's math
    acp = [math.exp(sum(math.log1p(-b) for b in beta[: k + 1])) for k in (0, 1, 99, 499, 999)]
    np.testing.assert_allclose(sched.alphas_cumprod[[0, 1, 99, 499, 999]].numpy(), acp, rtol=1e-12)
    assert sched.alphas_cumprod_prev[0] == 1.0
    assert float(sched.alphas_cumprod[-1]) == pytest.approx(4.0358e-5, rel=1e-3)  # well-known value


def test_snr_and_posterior_variance(sched):
    t = torch.tensor([0, 10, 500, 999])
    a = sched.alphas_cumprod[t]
    np.testing.assert_allclose(sched.snr(t).numpy(), (a / (1 - a)).numpy(), rtol=1e-14)
    assert torch.all(sched.snr(torch.arange(1000)).diff() < 0)  # monotone decreasing
    # β̃_0 = 0 (q(z_{-1}|z_0, x) is deterministic); β̃_t <= β_t
    assert float(sched.posterior_variance[0]) == 0.0
    assert torch.all(sched.posterior_variance <= sched.betas + 1e-18)


def test_gather_broadcasts_and_casts(sched):
    like = torch.zeros(3, 2, 4, 4, 4, dtype=torch.float32)
    g = sched.gather(sched.alphas_cumprod, torch.tensor([0, 5, 999]), like=like)
    assert g.shape == (3, 1, 1, 1, 1) and g.dtype == torch.float32
    assert float(g[2]) == pytest.approx(float(sched.alphas_cumprod[999]), rel=1e-6)
    with pytest.raises(IndexError):
        sched.gather(sched.alphas_cumprod, torch.tensor([1000]))


def test_q_sample_statistics(sched):
    gen = torch.Generator().manual_seed(0)
    mu, s = 1.5, 0.5
    n = 200_000
    for t in (0, 250, 999):
        z0 = mu + s * torch.randn(n, 1, generator=gen, dtype=torch.float64)
        noise = torch.randn(n, 1, generator=gen, dtype=torch.float64)
        zt = sched.q_sample(z0, torch.full((n,), t), noise)
        a = float(sched.alphas_cumprod[t])
        mean, std = math.sqrt(a) * mu, math.sqrt(a * s**2 + 1 - a)
        assert float(zt.mean()) == pytest.approx(mean, abs=4 * std / math.sqrt(n))
        assert float(zt.std()) == pytest.approx(std, rel=0.01)
        # predict_z0 inverts q_sample given the true noise
        assert torch.allclose(sched.predict_z0(zt, torch.full((n,), t), noise), z0, atol=1e-9)


def _posterior_mean(sched: NoiseSchedule, z_t: torch.Tensor, z0: torch.Tensor, t: int) -> torch.Tensor:
    """μ̃(z_t, z_0) of q(z_{t-1} | z_t, z_0), written from DDPM's eq. 7 (independent of the ε-form)."""
    b, a, ab, ab_prev = (float(v[t]) for v in (sched.betas, sched.alphas, sched.alphas_cumprod,
                                                sched.alphas_cumprod_prev))
    return (math.sqrt(ab_prev) * b / (1 - ab)) * z0 + (math.sqrt(a) * (1 - ab_prev) / (1 - ab)) * z_t


def _mean_from_eps(sched: NoiseSchedule, z_t: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """Posterior mean at the z_0 implied by a noise prediction."""
    ab = float(sched.alphas_cumprod[t])
    return _posterior_mean(sched, z_t, (z_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab), t)


def test_pdae_shift_coef_matches_posterior_mean_shift(sched):
    """μ(z_t, ε_θ - k_t G) == μ(z_t, ε_θ) + β̃_t G, with μ the posterior mean at the z_0 implied by ε."""
    gen = torch.Generator().manual_seed(1)
    for t in (1, 7, 100, 500, 999):
        z_t, eps, g = (torch.randn(4, 3, 5, generator=gen, dtype=torch.float64) for _ in range(3))
        k = float(sched.pdae_shift_coef(t))
        shifted = _mean_from_eps(sched, z_t, eps, t) + float(sched.posterior_variance[t]) * g
        torch.testing.assert_close(_mean_from_eps(sched, z_t, eps - k * g, t), shifted, rtol=1e-10, atol=1e-10)
    # batched call agrees with scalar calls
    ts = torch.tensor([1, 7, 999])
    np.testing.assert_allclose(sched.pdae_shift_coef(ts).numpy(), [float(sched.pdae_shift_coef(int(i))) for i in ts])


def test_pdae_weight_closed_form(sched):
    t = torch.arange(0, 1000, 37)
    snr = sched.snr(t).numpy()
    for gamma in (0.1, 0.5):
        ref = (1 / (1 + snr)) ** (1 - gamma) * (snr / (1 + snr)) ** gamma
        np.testing.assert_allclose(sched.pdae_weight(t, gamma).numpy(), ref, rtol=1e-12)


def test_invalid_schedule_raises_config_error():
    with pytest.raises(ConfigError, match="beta"):
        NoiseSchedule(1000, 0.1, 0.01)
    with pytest.raises(ConfigError, match="unknown key"):
        NoiseSchedule.from_config({"timesteps": 10, "betas": 1})
