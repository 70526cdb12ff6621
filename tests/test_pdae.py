"""PDAE loss and guided ε against independent computations."""

import pytest
import torch

from ldae.diffusion.pdae import guided_eps_fn, pdae_loss, unet_and_shift
from ldae.diffusion.schedule import NoiseSchedule
from ldae.nets.unet import LatentUNet

CFG = dict(in_channels=3, channels=[8, 16], num_res_blocks=1, attention_factors=[2], dropout=0.0,
           num_heads=2, norm_num_groups=4)


def _nets(seed: int = 0):
    torch.manual_seed(seed)
    unet = LatentUNet(**CFG).eval()
    for p in unet.decoder.out.parameters():  # make ε_θ non-trivial (its output layer starts at zero)
        torch.nn.init.normal_(p, std=0.05)
    shift = unet.make_shift_decoder(5)
    return unet, shift


def test_shift_zero_at_init_gives_unconditional_model():
    unet, shift = _nets()
    sched = NoiseSchedule()
    z = torch.randn(2, 3, 4, 6, 4)
    t = torch.tensor([10, 900])
    y = torch.randn(2, 5)
    eps, g = unet_and_shift(unet, shift, z, t, y)
    assert torch.count_nonzero(g) == 0
    torch.testing.assert_close(eps, unet(z, t))
    torch.testing.assert_close(guided_eps_fn(unet, shift, sched, y)(z, t), unet(z, t))


def test_pdae_loss_matches_manual_formula():
    unet, shift = _nets()
    for p in shift.decoder.out.parameters():  # non-zero G
        torch.nn.init.normal_(p, std=0.1)
    sched = NoiseSchedule()
    z0 = torch.randn(3, 3, 4, 6, 4)
    y = torch.randn(3, 5)
    gen = torch.Generator().manual_seed(7)
    loss = pdae_loss(unet, shift, sched, z0, y, gamma=0.1, generator=gen)
    # replay the same draws by hand
    gen = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (3,), generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    ab = sched.alphas_cumprod[t].float().reshape(-1, 1, 1, 1, 1)
    z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
    with torch.no_grad():
        eps = unet(z_t, t)
        g = shift(unet.encode(z_t, t)[1], t, y)
    a = sched.alphas[t]
    ab_prev = torch.where(t > 0, sched.alphas_cumprod[(t - 1).clamp_min(0)], torch.ones_like(a))
    k = (a.sqrt() * (1 - ab_prev) / (1 - sched.alphas_cumprod[t]).sqrt()).float().reshape(-1, 1, 1, 1, 1)
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    lam = (snr**0.1 / (1 + snr)).float()
    manual = (lam * ((noise - eps + k * g) ** 2).flatten(1).mean(1)).mean()
    torch.testing.assert_close(loss.detach(), manual, rtol=1e-5, atol=1e-7)


def test_guided_eps_uses_sqrt_one_minus_alphabar():
    unet, shift = _nets()
    for p in shift.decoder.out.parameters():
        torch.nn.init.normal_(p, std=0.1)
    sched = NoiseSchedule()
    z = torch.randn(2, 3, 4, 6, 4)
    t = torch.tensor([0, 999])
    y = torch.randn(2, 5)
    with torch.no_grad():
        g = shift(unet.encode(z, t)[1], t, y)
        expected = unet(z, t) - (1 - sched.alphas_cumprod[t]).sqrt().float().reshape(-1, 1, 1, 1, 1) * g
    torch.testing.assert_close(guided_eps_fn(unet, shift, sched, y)(z, t), expected)


def test_guidance_scale_multiplies_the_shift_and_is_validated():
    from ldae.diffusion.pdae import check_guidance_scale, run_guidance_scale
    from ldae.errors import ConfigError

    unet, shift = _nets()
    for p in shift.decoder.out.parameters():
        torch.nn.init.normal_(p, std=0.1)
    sched = NoiseSchedule()
    z = torch.randn(2, 3, 4, 6, 4)
    t = torch.tensor([10, 700])
    y = torch.randn(2, 5)
    with torch.no_grad():
        g = shift(unet.encode(z, t)[1], t, y)
        k = (1 - sched.alphas_cumprod[t]).sqrt().float().reshape(-1, 1, 1, 1, 1)
        expected = unet(z, t) - 2.5 * k * g
    torch.testing.assert_close(guided_eps_fn(unet, shift, sched, y, 2.5)(z, t), expected)
    # s = 1 is the paper's decoding, bit for bit
    assert torch.equal(guided_eps_fn(unet, shift, sched, y, 1.0)(z, t), guided_eps_fn(unet, shift, sched, y)(z, t))
    # the scale multiplies only the shift: ε̂(s) is affine in s, and without semantics it is ignored
    e1, e3 = (guided_eps_fn(unet, shift, sched, y, s)(z, t) for s in (1.0, 3.0))
    torch.testing.assert_close(guided_eps_fn(unet, shift, sched, y, 2.0)(z, t), (e1 + e3) / 2)
    torch.testing.assert_close(guided_eps_fn(unet, None, sched, None, 4.0)(z, t), unet(z, t))
    for bad in (0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ConfigError, match="expected a guidance scale > 0"):
            check_guidance_scale(bad, "where")
    assert run_guidance_scale({}, "c") == 1.0 and run_guidance_scale({"decoding": {"guidance_scale": None}}, "c") == 1.0
    assert run_guidance_scale({"decoding": {"guidance_scale": 3}}, "c") == 3.0
    with pytest.raises(ConfigError, match="run.ckpt: config key 'decoding.guidance_scale': expected"):
        run_guidance_scale({"decoding": {"guidance_scale": -2}}, "run.ckpt")


def test_gradients_reach_y_sem_and_not_the_frozen_unet():
    unet, shift = _nets()
    unet.requires_grad_(False)
    sched = NoiseSchedule()
    y = torch.randn(2, 5, requires_grad=True)
    opt = torch.optim.SGD(shift.parameters(), lr=0.1)
    z0 = torch.randn(2, 3, 4, 6, 4)
    for _ in range(3):  # at init G's output layer is zero, so y only gets gradient after a few steps
        opt.zero_grad()
        pdae_loss(unet, shift, sched, z0, y).backward()
        opt.step()
    y.grad = None
    pdae_loss(unet, shift, sched, z0, y).backward()
    assert y.grad is not None and float(y.grad.abs().sum()) > 0
    assert all(p.grad is None for p in unet.parameters())


def test_repeats_draw_several_timesteps_per_sample_with_its_y_sem():
    """repeats=K is the loss of the batch with each sample (and its y_sem) repeated K times in place, and
    the gradient to y_sem sums over a sample's K terms."""
    unet, shift = _nets()
    for p in shift.decoder.out.parameters():  # non-zero G
        torch.nn.init.normal_(p, std=0.1)
    sched = NoiseSchedule()
    z0 = torch.randn(2, 3, 4, 6, 4)
    y = torch.randn(2, 5, requires_grad=True)
    loss = pdae_loss(unet, shift, sched, z0, y, generator=torch.Generator().manual_seed(3), repeats=3)
    (grad,) = torch.autograd.grad(loss, y)
    y_rep = y.detach()[[0, 0, 0, 1, 1, 1]].requires_grad_(True)
    ref = pdae_loss(unet, shift, sched, z0[[0, 0, 0, 1, 1, 1]], y_rep, generator=torch.Generator().manual_seed(3))
    (grad_rep,) = torch.autograd.grad(ref, y_rep)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, grad_rep.reshape(2, 3, 5).sum(1))
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        pdae_loss(unet, shift, sched, z0, y, repeats=0)
