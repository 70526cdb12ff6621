"""Evaluation diagnostics (issue 17): DDPM memorisation per timestep band, the gap G_ψ fills, the
representation table; values checked against hand computations and stubs with known behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldae.diffusion.schedule import NoiseSchedule
from ldae.evaluation.sections.diagnostics import (
    band_draws,
    check_bands,
    denoising_errors,
    diagnostics_section,
    representation_table,
    subsample,
)

SHAPE = (3, 4, 4, 4)


class MemorisingDenoiser(torch.nn.Module):
    """ε_θ(z_t, t) of the empirical training distribution's nearest neighbour: explains z_t by the closest
    training latent z* (ε = (z_t − √ᾱ z*) / √(1−ᾱ)): perfect on its training latents at small t."""

    def __init__(self, train: torch.Tensor, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.train_z, self.schedule = train, schedule

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.schedule.gather(self.schedule.alphas_cumprod, t, like=z_t)
        d = ((z_t[:, None] / a.sqrt()[:, None] - self.train_z[None]) ** 2).flatten(2).sum(-1)
        z_star = self.train_z[d.argmin(dim=1)]
        return (z_t - a.sqrt() * z_star) / (1 - a).sqrt()


class ZeroDenoiser(torch.nn.Module):
    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(z_t)


def _tiny_nets(cond_dim: int = 6):
    from ldae.nets.unet import build_shift_decoder, build_unet

    torch.manual_seed(0)
    unet = build_unet({"channels": [8, 16], "num_res_blocks": 1, "attention_factors": [], "num_heads": 2,
                       "norm_num_groups": 4, "in_channels": 3, "dropout": 0.0}).eval()
    shift = build_shift_decoder(unet.config, cond_dim).eval()
    return unet, shift


def _gap_case() -> tuple:
    """Tiny nets, 6 training / 5 held-out latents and three code sets: held-out y_sem, another subject's
    for the held-out scans, and training y_sem (in that order from one generator)."""
    unet, shift = _tiny_nets()
    g = torch.Generator().manual_seed(0)
    z_train, z_held = torch.randn(6, *SHAPE, generator=g), torch.randn(5, *SHAPE, generator=g)
    y, y_other, y_train = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g), torch.randn(6, 6, generator=g)
    return unet, shift, z_train, z_held, y, y_other, y_train


def _randomise(shift: torch.nn.Module) -> None:
    """A random, non-zero G_ψ (fixed seed)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in shift.parameters():
            p.normal_(0, 0.05)


def test_bands_are_clipped_and_draws_shared_by_position() -> None:
    assert check_bands([(0, 50), (50, 200), (900, 2000), (1000, 1200)], 1000) == [(0, 50), (50, 200), (900, 1000)]
    with pytest.raises(ValueError):
        check_bands([(1000, 1200)], 1000)
    t, noise = band_draws(5, SHAPE, (50, 200), 2, torch.Generator().manual_seed(3))
    assert t.shape == (2, 5) and noise.shape == (2, 5, *SHAPE) and int(t.min()) >= 50 and int(t.max()) < 200
    t2, noise2 = band_draws(5, SHAPE, (50, 200), 2, torch.Generator().manual_seed(3))
    assert torch.equal(t, t2) and torch.equal(noise, noise2)
    assert subsample(range(10), 4, 0) == sorted(subsample(range(10), 4, 0)) and len(subsample(range(10), 4, 0)) == 4
    assert subsample(range(3), 4, 0) == [0, 1, 2]


def test_zero_denoiser_loss_is_the_noise_energy() -> None:
    """ε_θ = 0: the loss per latent is the mean of ε², computed here by hand from the same draws."""
    schedule = NoiseSchedule(T=1000)
    z = torch.randn(7, *SHAPE, generator=torch.Generator().manual_seed(1))
    t, noise = band_draws(7, SHAPE, (0, 50), 1, torch.Generator().manual_seed(0))
    (plain,) = denoising_errors(ZeroDenoiser(), schedule, z, t[0], noise[0], batch_size=3)
    np.testing.assert_allclose(plain, (noise[0].double() ** 2).flatten(1).mean(1).numpy(), rtol=1e-12)


def test_memorising_ddpm_gives_ratio_below_one() -> None:
    schedule = NoiseSchedule(T=1000)
    g = torch.Generator().manual_seed(0)
    z_train, z_held = torch.randn(40, *SHAPE, generator=g), torch.randn(40, *SHAPE, generator=g)
    unet = MemorisingDenoiser(z_train, schedule)
    res = diagnostics_section(unet, None, schedule, z_train, z_held, torch.zeros(40, 2), None,
                              bands=[(0, 50), (50, 200), (500, 1000)], seed=0, batch_size=16)
    assert [b.band for b in res.bands] == [[0, 50], [50, 200], [500, 1000]] and res.gap == []
    low = res.bands[0]
    assert low.train < 1e-6 and low.held_out > 1.0 and low.ratio < 1e-6  # perfect recall of training latents
    assert all(b.ratio < 1 for b in res.bands)
    # a model that does not know the training set (ε_θ = 0): ratio ≈ 1 (same draws, same-law latents)
    flat = diagnostics_section(ZeroDenoiser(), None, schedule, z_train, z_held, torch.zeros(40, 2), None,
                               bands=[(0, 50)], seed=0)
    assert flat.bands[0].ratio == pytest.approx(1.0)  # ε_θ = 0 ignores the latents: identical draws, identical loss


def test_gap_is_zero_when_the_shift_is_zero_and_matches_a_hand_computation() -> None:
    schedule = NoiseSchedule(T=1000)
    unet, shift, z_train, z_held, y, y_other, _ = _gap_case()
    with torch.no_grad():
        for p in shift.parameters():
            p.zero_()
    res = diagnostics_section(unet, shift, schedule, z_train, z_held, y, y_other, bands=[(0, 50), (200, 500)],
                              draws=2, seed=4, batch_size=2)
    for gap in res.gap:  # G_ψ = 0: with either y_sem the loss is the plain one, exactly
        assert gap.own == gap.plain and gap.other == gap.plain and gap.gap_own == 0.0
    # a random (non-zero) shift: check the own-y_sem loss against a direct computation of the formula
    _randomise(shift)
    res = diagnostics_section(unet, shift, schedule, z_train, z_held, y, y_other, bands=[(200, 500)], draws=1,
                              seed=4, batch_size=2)
    t, noise = band_draws(6, SHAPE, (200, 500), 1, torch.Generator().manual_seed(4))
    t, noise = t[0, :5], noise[0, :5]
    with torch.no_grad():
        z_t = schedule.q_sample(z_held, t, noise)
        eps = unet(z_t, t)
        h, skips, emb = unet.encode(z_t, t)
        g_own = shift(skips, t, y, emb)
        k = schedule.pdae_shift_coef(t).float().reshape(-1, 1, 1, 1, 1)
    plain = float(((noise - eps).double() ** 2).flatten(1).mean(1).mean())
    own = float(((noise - (eps - k * g_own)).double() ** 2).flatten(1).mean(1).mean())
    # the shared UNet pass is unet_and_shift's computation
    from ldae.diffusion.pdae import unet_and_shift

    with torch.no_grad():
        e2, g2 = unet_and_shift(unet, shift, z_t, t, y)
    assert torch.equal(e2, eps) and torch.equal(g2, g_own)
    assert res.gap[0].plain == pytest.approx(plain, rel=1e-6)
    assert res.gap[0].own == pytest.approx(own, rel=1e-6) and res.gap[0].own != pytest.approx(plain, rel=1e-9)
    assert res.gap[0].gap_own == pytest.approx((plain - own) / plain, rel=1e-5)
    assert 0.0 <= res.gap[0].own_beats_other <= 1.0
    js = res.to_json()
    assert set(js) == {"n_train", "n_held_out", "draws", "seed", "denoising_loss", "gap", "representation"}
    assert js["n_train"] == 6 and js["n_held_out"] == 5


def test_representation_table_gathers_r2_and_auc_on_one_split() -> None:
    import pandas as pd

    from ldae.evaluation.sections.probing import factor_section, probe_section

    rng = np.random.default_rng(0)
    n_sub = 60
    rows = []
    for s in range(n_sub):
        dx = ("CN", "AD")[s % 2]
        vent = 30 + 10 * (dx == "AD") + rng.normal(0, 3)
        for k in range(2):
            rows.append({"subject": f"s{s}", "session": k, "diagnosis": dx, "age": 70 + rng.normal(0, 5) + k,
                         "split": "test" if s % 5 == 0 else "train", "ventricle_volume_ml": vent + 0.1 * k})
    df = pd.DataFrame(rows)
    good = np.column_stack([df["ventricle_volume_ml"] + rng.normal(0, 0.5, len(df)), rng.normal(size=len(df))])
    noise = rng.normal(size=(len(df), 2))
    feats = {"learned": good, "voxel_pca": noise}
    probes = probe_section(feats, df, 0)
    factors = factor_section(feats, df, ["ventricle_volume_ml"], 0)
    table = representation_table(probes, factors)
    assert list(table) == ["learned", "voxel_pca"]
    assert table["learned"]["ventricle_volume_ml_r2"] == factors.fits["learned"]["ventricle_volume_ml"].r2 > 0.9
    assert table["voxel_pca"]["ventricle_volume_ml_r2"] < 0.2
    assert table["learned"]["ventricle_volume_ml_cv_r2"] == factors.fits["learned"]["ventricle_volume_ml"].cv_r2 > 0.9
    assert table["voxel_pca"]["ventricle_volume_ml_cv_r2"] < 0.1
    assert table["learned"]["ad_auc"] == probes["learned"].ad_vs_cn.auc > 0.9
    assert table["learned"]["ad_cv_auc"] == probes["learned"].ad_vs_cn.cv_auc_best
    assert "latent_r2" not in table["learned"]  # no read-out given
    readout = {"learned": {"r2": 0.4, "cv_r2": 0.7}}
    with_readout = representation_table(probes, factors, readout)
    assert with_readout["learned"]["latent_r2"] == 0.4 and with_readout["learned"]["latent_cv_r2"] == 0.7
    assert "latent_r2" not in with_readout["voxel_pca"]


def test_gap_on_training_latents_matches_a_hand_computation() -> None:
    """``gap_own_train``: the own-y_sem gap on the training latents with their draws; None without y_train."""
    schedule = NoiseSchedule(T=1000)
    unet, shift, z_train, z_held, y, _, y_train = _gap_case()
    _randomise(shift)
    res = diagnostics_section(unet, shift, schedule, z_train, z_held, y, None, bands=[(200, 500)], draws=1,
                              seed=4, batch_size=4, y_train=y_train)
    t, noise = band_draws(6, SHAPE, (200, 500), 1, torch.Generator().manual_seed(4))
    t, noise = t[0], noise[0]
    with torch.no_grad():
        z_t = schedule.q_sample(z_train, t, noise)
        h, skips, emb = unet.encode(z_t, t)
        eps = unet.decode(h, skips, emb)
        k = schedule.pdae_shift_coef(t).float().reshape(-1, 1, 1, 1, 1)
        own = ((noise - (eps - k * shift(skips, t, y_train, emb))).double() ** 2).flatten(1).mean(1).mean()
        plain = ((noise - eps).double() ** 2).flatten(1).mean(1).mean()
    assert res.bands[0].train == pytest.approx(float(plain), rel=1e-6)  # the memorisation column is unchanged
    assert res.gap[0].gap_own_train == pytest.approx(float((plain - own) / plain), rel=1e-5)
    assert res.gap[0].gap_own_train != pytest.approx(0.0, abs=1e-9)
    assert res.gap[0].to_json()["gap_own_train"] == res.gap[0].gap_own_train
    none = diagnostics_section(unet, shift, schedule, z_train, z_held, y, None, bands=[(200, 500)], seed=4)
    assert none.gap[0].gap_own_train is None
