"""Stage 1: loss values against closed forms, gradient isolation between generator and discriminator,
weight loading (strict, old MONAI Generative format), perceptual-loss fallback, and a short real fit."""

from __future__ import annotations

import logging
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from scipy.ndimage import gaussian_filter

from ldae.checkpoints import load_autoencoder
from ldae.config import load_preset
from ldae.errors import CheckpointError, ConfigError
from ldae.nets.autoencoder import build_autoencoder, discriminator_logits, kl_loss, l1_loss, latent_shape
from ldae.nets.perceptual import NetworkAccessBlocked, build_perceptual_loss, no_network
from ldae.training.autoencoder import AutoencoderModule, fit, frozen, lr_factor

SMALL_MODEL = {"channels": [8, 16], "latent_channels": 3, "num_res_blocks": 1, "norm_num_groups": 4}


def _cfg(tmp_path: Path, csv: Path | None = None, **model: object) -> dict:
    cfg = load_preset("tiny", "autoencoder")
    cfg["out"] = str(tmp_path / "run")
    cfg["data"]["csv"] = str(csv) if csv else None
    cfg["model"].update(model)
    return cfg


def _module(tmp_path: Path) -> AutoencoderModule:
    cfg = _cfg(tmp_path, **SMALL_MODEL)
    cfg["discriminator"].update(channels=8, num_layers_d=2)
    return AutoencoderModule(cfg)


def _smooth_batch(n: int = 2, shape=(16, 16, 16), seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.random((n, 1, *shape)), sigma=(0, 0, 2, 2, 2))
    x = (x - x.min()) / (x.max() - x.min())
    return torch.from_numpy(x.astype(np.float32))


# ---------------------------------------------------------------- loss terms


def test_kl_matches_torch_distributions() -> None:
    mu = torch.randn(3, 3, 2, 3, 2)
    sigma = torch.rand(3, 3, 2, 3, 2) + 0.2
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 1.0)
    ).flatten(1).sum(1).mean()
    assert kl_loss(mu, sigma).item() == pytest.approx(ref.item(), rel=1e-5)
    assert kl_loss(torch.zeros(2, 3, 2, 2, 2), torch.ones(2, 3, 2, 2, 2)).item() == pytest.approx(0.0, abs=1e-7)


def test_l1_matches_numpy() -> None:
    a, b = torch.rand(2, 1, 5, 6, 7), torch.rand(2, 1, 5, 6, 7)
    assert l1_loss(a, b).item() == pytest.approx(float(np.abs(a.numpy() - b.numpy()).mean()), rel=1e-6)


def test_discriminator_loss_is_least_squares(tmp_path: Path) -> None:
    module = _module(tmp_path)
    x, recon = _smooth_batch(seed=1), _smooth_batch(seed=2)
    loss = module.discriminator_backward(x, recon)
    # MONAI's least-squares criterion applies LeakyReLU(0.05) to the logits before the squared error
    with torch.no_grad():
        fake = F.leaky_relu(discriminator_logits(module.discriminator, recon), 0.05)
        real = F.leaky_relu(discriminator_logits(module.discriminator, x), 0.05)
    ref = 0.5 * ((fake**2).mean() + ((real - 1) ** 2).mean())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_latent_shape_and_paper_grid() -> None:
    paper = load_preset("paper", "autoencoder")
    assert latent_shape(paper["model"], paper["data"]["shape"]) == (3, 16, 20, 16)
    tiny = load_preset("tiny", "autoencoder")
    assert latent_shape(tiny["model"], tiny["data"]["shape"]) == (3, 8, 10, 8)
    with pytest.raises(ConfigError, match="divisible by 4"):
        latent_shape(tiny["model"], [30, 40, 32])
    net = build_autoencoder(SMALL_MODEL)
    z_mu, z_sigma = net.encode(torch.rand(1, 1, 16, 12, 8))
    assert z_mu.shape == (1, 3, 8, 6, 4) and torch.all(z_sigma > 0)


# ---------------------------------------------------------------- gradient isolation


def test_generator_and_discriminator_gradients_do_not_leak(tmp_path: Path) -> None:
    module = _module(tmp_path)
    g_params = list(module.autoencoder.parameters())
    d_params = list(module.discriminator.parameters())
    x = _smooth_batch()

    recon, terms = module.generator_backward(x, adversarial=True)
    assert "adv_g" in terms and terms["adv_g"] > 0
    assert all(p.grad is None for p in d_params), "generator loss leaked into the discriminator"
    assert sum(float(p.grad.abs().sum()) for p in g_params if p.grad is not None) > 0
    g_grads = [None if p.grad is None else p.grad.clone() for p in g_params]

    module.discriminator_backward(x, recon)
    assert sum(float(p.grad.abs().sum()) for p in d_params if p.grad is not None) > 0
    for p, before in zip(g_params, g_grads):
        assert (p.grad is None and before is None) or torch.equal(p.grad, before), "D loss leaked into G"
    assert all(p.requires_grad for p in g_params + d_params)  # flags restored

    # the check is meaningful: without freezing, the generator's adversarial term does reach D
    module.zero_grad(set_to_none=True)
    r, _, _ = module.autoencoder(x)
    discriminator_logits(module.discriminator, r).mean().backward()
    assert any(p.grad is not None for p in d_params)


def test_generator_loss_is_the_weighted_sum(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, **SMALL_MODEL)
    cfg["discriminator"].update(channels=8, num_layers_d=2)

    class MeanSquare(torch.nn.Module):  # stand-in for the (local-weights) perceptual network
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return ((a - b) ** 2).mean()

    module = AutoencoderModule(cfg, perceptual=MeanSquare())
    assert "perceptual" not in dict(module.named_children())  # never saved in checkpoints
    _, t = module.generator_backward(_smooth_batch(), adversarial=True)
    loss = cfg["loss"]
    expected = (loss["l1_weight"] * t["l1"] + loss["kl_weight"] * t["kl"]
                + loss["perceptual_weight"] * t["perceptual"] + loss["adversarial_weight"] * t["adv_g"])
    assert t["loss_g"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss["kl_weight"] == 1e-7 and loss["adversarial_weight"] == 0.025 and loss["perceptual_weight"] == 1e-3
    assert t["perceptual"] > 0 and module.adversary_active() is False  # epoch 0 < warm-up epochs


def test_non_finite_gradients_skip_the_step(tmp_path: Path) -> None:
    module = _module(tmp_path)
    module.clip_val = None  # clipping goes through the Trainer; this test drives the module alone
    params = list(module.discriminator.parameters())
    opt = torch.optim.Adam(params, lr=0.1)
    before = [p.detach().clone() for p in params]
    for _ in range(module.max_skips):
        for p in params:
            p.grad = torch.ones_like(p)
        params[0].grad[0] = float("nan")
        module._optimizer_step(opt, "discriminator")
        assert all(torch.equal(p, b) for p, b in zip(params, before)) and params[0].grad is None
    params[0].grad = torch.full_like(params[0], float("inf"))
    with pytest.raises(FloatingPointError, match="consecutive optimizer steps"):
        module._optimizer_step(opt, "discriminator")
    module._skips["discriminator"] = 0
    params[0].grad = torch.ones_like(params[0])
    module._optimizer_step(opt, "discriminator")
    assert not torch.equal(params[0], before[0]) and torch.isfinite(params[0]).all()


def test_lr_factor_schedules() -> None:
    assert [lr_factor(e, 4) for e in range(5)] == [1.0] * 5
    cosine = [lr_factor(e, 4, "cosine", 0.1) for e in range(5)]
    np.testing.assert_allclose(cosine, [0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * e / 4)) for e in range(5)])
    assert cosine[0] == 1.0 and cosine[-1] == pytest.approx(0.1) and np.all(np.diff(cosine) < 0)
    with pytest.raises(ConfigError, match="optim.lr_schedule"):
        lr_factor(0, 4, "linear")


def test_frozen_restores_flags() -> None:
    net = torch.nn.Linear(2, 2)
    net.bias.requires_grad_(False)
    with frozen(net):
        assert not any(p.requires_grad for p in net.parameters())
    assert net.weight.requires_grad and not net.bias.requires_grad


def test_generator_steps_decrease_loss(tmp_path: Path) -> None:
    module = _module(tmp_path)
    opt = torch.optim.Adam(module.autoencoder.parameters(), lr=2e-3)
    x = _smooth_batch()
    losses = []
    for _ in range(30):
        _, terms = module.generator_backward(x, adversarial=False)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(terms["l1"]))
    assert losses[-1] < 0.6 * losses[0], losses


# ---------------------------------------------------------------- weights


def test_init_weights_strict_error_lists_keys(tmp_path: Path) -> None:
    state = build_autoencoder(SMALL_MODEL).state_dict()
    state.pop("quant_conv_mu.conv.weight")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        build_autoencoder({**SMALL_MODEL, "init_weights": str(path)})
    msg = str(err.value)
    assert "model.init_weights" in msg and "quant_conv_mu.conv.weight" in msg and "extra.weight" in msg
    assert "1 missing" in msg and "1 unexpected" in msg
    with pytest.raises(CheckpointError, match="file not found"):
        build_autoencoder({**SMALL_MODEL, "init_weights": str(tmp_path / "none.pt")})


def test_init_weights_plain_and_old_monai_generative_format(tmp_path: Path) -> None:
    source = build_autoencoder(SMALL_MODEL)
    state = source.state_dict()
    torch.save({"state_dict": state}, tmp_path / "new.pt")
    # MONAI Generative named the decoder's upsampling conv 'conv' (now 'postconv')
    old = {k.replace("postconv", "conv"): v for k, v in state.items()}
    assert set(old) != set(state)
    torch.save(old, tmp_path / "old.pt")
    for name in ("new.pt", "old.pt"):
        net = build_autoencoder({**SMALL_MODEL, "init_weights": str(tmp_path / name)})
        for k, v in net.state_dict().items():
            assert torch.equal(v, state[k]), (name, k)
    # an old-format dict with a key missing is refused, not half-loaded
    old.pop("decoder.blocks.0.conv.weight", None)
    old.pop(next(k for k in old if k.startswith("encoder.")))
    torch.save(old, tmp_path / "old_partial.pt")
    with pytest.raises(CheckpointError, match="missing key"):
        build_autoencoder({**SMALL_MODEL, "init_weights": str(tmp_path / "old_partial.pt")})


def test_load_autoencoder_refuses_other_stage_and_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "diffusion.ckpt"
    torch.save({"state_dict": {}, "ldae": {"stage": "diffusion", "config": {}}}, path)
    with pytest.raises(CheckpointError, match="stage 'diffusion', expected stage 'autoencoder'"):
        load_autoencoder(path)
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot load"):
        load_autoencoder(tmp_path / "junk.ckpt")


# ---------------------------------------------------------------- perceptual loss / config


def test_perceptual_disabled_without_local_weights(caplog: pytest.LogCaptureFixture) -> None:
    loss_cfg = load_preset("tiny", "autoencoder")["loss"]
    with caplog.at_level(logging.WARNING, logger="ldae"):
        setup = build_perceptual_loss(loss_cfg)
    assert not setup.enabled and setup.status.startswith("disabled (no local weights")
    assert sum("perceptual loss disabled" in r.getMessage() for r in caplog.records) == 1
    assert build_perceptual_loss({**loss_cfg, "perceptual_weight": 0}).status.startswith("disabled")
    with pytest.raises(ConfigError, match="loss.perceptual_weights.*not found"):
        build_perceptual_loss({**loss_cfg, "perceptual_weights": "/nonexistent/r50.pt"})
    with pytest.raises(ConfigError, match="loss.perceptual_network"):
        build_perceptual_loss({**loss_cfg, "perceptual_weights": "x", "perceptual_network": "vit"})


def test_no_network_blocks_downloads(tmp_path: Path) -> None:
    with no_network(), pytest.raises(NetworkAccessBlocked):
        urllib.request.urlopen("http://198.51.100.1/weights.pth", timeout=1)
    with no_network(), pytest.raises(NetworkAccessBlocked):
        torch.hub.download_url_to_file("https://example.invalid/w.pth", str(tmp_path / "w.pth"), progress=False)
    # an LPIPS network whose cache is empty is disabled (lpips absent or download blocked), never fetched
    setup = build_perceptual_loss(
        {"perceptual_weight": 1e-3, "perceptual_network": "alex", "perceptual_weights": str(tmp_path)}
    )
    assert not setup.enabled and not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_perceptual_resnet50_from_local_file(tmp_path: Path) -> None:
    import torchvision

    weights = tmp_path / "resnet50.pt"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    setup = build_perceptual_loss(
        {"perceptual_weight": 1e-3, "perceptual_network": "resnet50", "perceptual_weights": str(weights)}
    )
    assert setup.enabled and str(weights) in setup.status
    x = _smooth_batch(1, (12, 12, 12))
    assert setup.loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert setup.loss(x, x.flip(2)).item() > 0
    assert not any(p.requires_grad for p in setup.loss.parameters())


def test_fit_config_errors(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    with pytest.raises(ConfigError, match="data.csv"):
        fit(cfg)
    cfg["data"]["csv"] = "x.csv"
    cfg["trainer"]["gradient_clip_val"] = 1.0
    with pytest.raises(ConfigError, match="optim.gradient_clip_val"):
        fit(cfg)


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_fit_phantom_cohort_end_to_end(tmp_path: Path, phantom_cohort: Path) -> None:
    cfg = _cfg(tmp_path, phantom_cohort)
    cfg["data"]["val_fraction"] = 0.2
    cfg["trainer"]["max_epochs"] = 3
    cfg["trainer"].update(enable_progress_bar=False, log_every_n_steps=1)
    cfg["loss"]["adversarial_warmup_epochs"] = 2
    best = fit(cfg)
    out = Path(cfg["out"])
    assert best == out / "checkpoints" / "best.ckpt" and (out / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in (out / "figures").glob("*.png")) == [f"val_epoch{i:03d}.png" for i in range(3)]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["loss"]["perceptual_status"].startswith("disabled (no local weights")

    metrics = pd.read_csv(out / "logs" / "metrics.csv")
    l1 = metrics["train/l1_epoch"].dropna().to_numpy()
    assert len(l1) == 3 and l1[-1] < l1[0]
    assert metrics["train/loss_d_epoch"].dropna().size == 1  # adversary only in the last epoch
    lr = metrics["train/lr_generator"].dropna().to_numpy()  # cosine schedule over the epochs
    np.testing.assert_allclose(lr, [1e-3 * lr_factor(e, 3, "cosine", 0.05) for e in range(3)], rtol=1e-5)
    val = metrics["val/ssim"].dropna().to_numpy()
    assert len(val) == 3 and np.all((val > 0) & (val <= 1))

    net, run_cfg = load_autoencoder(best)
    assert not net.training and run_cfg["stage"] == "autoencoder"
    assert not any(p.requires_grad for p in net.parameters())
    ckpt = torch.load(best, weights_only=True)
    assert ckpt["ldae"]["latent_shape"] == [3, 8, 10, 8]
    assert torch.equal(net.state_dict()["quant_conv_mu.conv.weight"],
                       ckpt["state_dict"]["autoencoder.quant_conv_mu.conv.weight"])
    # best = the epoch with the highest val/ssim (recompute it from the reloaded weights)
    from ldae.data.datamodule import VolumeDataModule
    from ldae.metrics import ssim3d

    dm = VolumeDataModule(phantom_cohort, spacing=6.0, shape=(32, 40, 32), seed=0, val_fraction=0.2)
    dm.setup()
    x = torch.stack([dm.datasets["val"][i]["image"] for i in range(len(dm.datasets["val"]))])
    with torch.no_grad():
        ssim = ssim3d(net.reconstruct(x).clamp(0, 1), x).mean().item()
    assert ssim == pytest.approx(val.max(), abs=2e-3)

    with pytest.raises(ConfigError, match="--resume"):
        fit(cfg)
    cfg["trainer"]["max_epochs"] = 4
    fit(cfg, resume=True)  # continues from last.ckpt: one more epoch, adversary on
    metrics = pd.read_csv(out / "logs" / "metrics.csv")
    assert (out / "figures" / "val_epoch003.png").is_file()
    assert metrics["train/loss_d_epoch"].dropna().size == 2


@pytest.mark.slow
def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path, phantom_cohort: Path) -> None:
    cfg = _cfg(tmp_path, phantom_cohort, **SMALL_MODEL)
    cfg["data"].update(shape=[16, 20, 16], batch_size=1)
    cfg["trainer"].update(max_epochs=1, limit_train_batches=5, enable_progress_bar=False)
    cfg["loss"]["adversarial_warmup_epochs"] = 5  # generator only: one optimizer
    cfg["optim"]["accumulate_grad_batches"] = 2
    import lightning.pytorch as pl

    seen: list[int] = []

    class Spy(pl.Callback):
        def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            seen.append(trainer.global_step)

    import ldae.training.common as stage

    original = stage.make_trainer
    stage.make_trainer = lambda *a, **k: original(*a, callbacks=[Spy()], **k)
    try:
        fit(cfg)
    finally:
        stage.make_trainer = original
    assert seen == [3]  # 5 batches, accumulate 2 -> steps after batches 2, 4 and the last one
