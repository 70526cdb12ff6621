"""DDIM against a brute-force eq. 2 and against the analytic optimal ε of Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch

from ldae.diffusion.ddim import ddim_invert, ddim_sample, ddim_step, ddim_timesteps
from ldae.diffusion.schedule import NoiseSchedule
from ldae.errors import ConfigError

SCHED = NoiseSchedule(1000, 1e-4, 2e-2)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests are thousands of tiny element-wise ops: one thread avoids OpenMP contention when
    other processes share the 2 cores (10-1000x slower otherwise), and is as fast when idle."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def brute_force_eq2(x_t, eps, t, t_prev, eta, noise):
    """DDIM eq. 2 written element by element from the paper, with plain Python floats."""
    ab = [1.0]
    for i in range(1000):  # ᾱ rebuilt from scratch: ab[i + 1] is ᾱ_i
        ab.append(ab[-1] * (1.0 - (1e-4 + (2e-2 - 1e-4) * i / 999)))
    a_t = ab[t + 1]
    a_p = ab[t_prev + 1] if t_prev >= 0 else 1.0
    sigma = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
    out = []
    for x, e, n in zip(x_t.flatten().tolist(), eps.flatten().tolist(), noise.flatten().tolist()):
        pred_x0 = (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
        out.append(math.sqrt(a_p) * pred_x0 + math.sqrt(1 - a_p - sigma**2) * e + sigma * n)
    return torch.tensor(out, dtype=torch.float64).reshape(x_t.shape)


@pytest.mark.parametrize("t,t_prev,eta", [(999, 888, 0.0), (500, 400, 0.0), (500, 400, 1.0), (20, -1, 0.5)])
def test_ddim_step_matches_brute_force(t, t_prev, eta):
    gen = torch.Generator().manual_seed(t)
    x, e, n = (torch.randn(2, 3, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    a_t = float(SCHED.alphas_cumprod[t])
    a_p = float(SCHED.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
    ours, _ = ddim_step(x, e, a_t, a_p, eta=eta, noise=n)
    torch.testing.assert_close(ours, brute_force_eq2(x, e, t, t_prev, eta, n), rtol=1e-10, atol=1e-10)


def test_timesteps_even_ascending_and_include_last():
    for steps in (1, 2, 10, 20, 50, 100, 333, 1000):
        ts = ddim_timesteps(steps, 1000)
        assert len(ts) == steps and int(ts[-1]) == 999
        assert len(set(ts.tolist())) == steps and torch.all(ts.diff() > 0)
        if steps > 1:
            assert int(ts[0]) == 0
            gaps = ts.diff().double()
            assert float(gaps.max() - gaps.min()) <= 1.0  # evenly spaced up to rounding
    assert ddim_timesteps(10, 1000).tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    with pytest.raises(ConfigError):
        ddim_timesteps(0, 1000)
    with pytest.raises(ConfigError):
        ddim_timesteps(1001, 1000)


def gaussian_eps(mu: torch.Tensor | float, s: float):
    """Optimal ε for data ~ N(μ, s² I): E[ε | z_t] = (z_t − √ᾱ μ)·√(1−ᾱ)/(ᾱ s² + 1−ᾱ)."""

    def eps_fn(z, t):
        assert bool((t == t[0]).all())  # DDIM evaluates one timestep per call
        a = float(SCHED.alphas_cumprod[int(t[0])])
        return (z - math.sqrt(a) * mu) * (math.sqrt(1 - a) / (a * s**2 + 1 - a))

    return eps_fn


@pytest.mark.parametrize("eta,std_tol", [(0.0, 0.01), (1.0, 0.02)])
def test_sampling_reproduces_gaussian_data(eta, std_tol):
    """1000 steps from pure noise give data with the right mean (per voxel) and std, within 1%.

    With η = 1 (ancestral sampling with the posterior variance β̃) the reverse variance is only exact
    for point-mass data, so for s < 1 the std comes out slightly low (-1.0% here): 2% tolerance."""
    gen = torch.Generator().manual_seed(0)
    mu = torch.linspace(0.5, 3.0, 16, dtype=torch.float64).reshape(1, 1, 2, 2, 4)
    s, n = 0.6, 4096
    z_T = torch.randn(n, 1, 2, 2, 4, generator=gen, dtype=torch.float64)
    x = ddim_sample(gaussian_eps(mu, s), z_T, SCHED, steps=1000, eta=eta, generator=gen)
    dev = x - mu
    assert abs(float(dev.mean())) < 0.01 * float(mu.mean())  # pooled mean within 1%
    assert float((x.mean(0) - mu).abs().max()) < 5 * s / math.sqrt(n)  # every voxel's mean
    assert float(dev.std()) == pytest.approx(s, rel=std_tol)  # pooled std
    assert float(x.std(0).min()) > 0.93 * s and float(x.std(0).max()) < 1.07 * s


def round_trip_rms(steps: int, n: int = 256) -> float:
    gen = torch.Generator().manual_seed(1)
    mu, s = 0.0, 1.0
    x0 = mu + s * torch.randn(n, 3, 4, 4, 4, generator=gen, dtype=torch.float64)
    fn = gaussian_eps(mu, s)
    z_T = ddim_invert(fn, x0, SCHED, steps)
    back = ddim_sample(fn, z_T, SCHED, steps)
    return float((back - x0).pow(2).mean().sqrt() / x0.std())


def test_inversion_round_trip_error_shrinks_linearly():
    errors = {steps: round_trip_rms(steps) for steps in (10, 20, 50, 100, 1000)}
    print("DDIM round-trip relative RMS error:", {k: f"{v:.4g}" for k, v in errors.items()})
    vals = list(errors.values())
    assert all(a > b for a, b in zip(vals, vals[1:]))  # shrinks with more steps
    # first order: error ∝ step size, so doubling / 5x / 10x the steps divides it by about that factor
    assert 1.6 < errors[10] / errors[20] < 2.6
    assert 3.5 < errors[10] / errors[50] < 6.5
    assert 7.0 < errors[10] / errors[100] < 13.0
    assert errors[100] < 0.05 and errors[1000] < 0.005


def test_inversion_is_deterministic_and_batched():
    fn = gaussian_eps(0.3, 0.8)
    x0 = torch.randn(5, 2, 3, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    full = ddim_invert(fn, x0, SCHED, 20)
    single = torch.cat([ddim_invert(fn, x0[i : i + 1], SCHED, 20) for i in range(5)])
    torch.testing.assert_close(full, single)
    calls: list[int] = []

    def counting(z, t):
        calls.append(int(t[0]))
        assert t.shape == (z.shape[0],) and t.dtype == torch.long
        return fn(z, t)

    ddim_invert(counting, x0, SCHED, 7)
    assert len(calls) == 7 and max(calls) < 999 and calls[0] == 0  # never past the end
    calls.clear()
    ddim_sample(counting, full, SCHED, 7)
    assert calls == ddim_timesteps(7).flip(0).tolist()


def test_no_clamping_by_default_and_optional_clip():
    fn = gaussian_eps(5.0, 0.5)  # data far outside [-1, 1]
    z_T = torch.randn(64, 1, 2, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = ddim_sample(fn, z_T, SCHED, 50)
    assert float(x.mean()) == pytest.approx(5.0, abs=0.2)
    x_clip = ddim_sample(fn, z_T, SCHED, 50, clip=1.0)
    assert float(x_clip.abs().max()) <= 1.0 + 1e-9
