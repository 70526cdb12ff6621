"""Stage 3 and the LDAE model API on a briefly trained tiny run (tests/conftest.py::tiny_run)."""

from pathlib import Path

import pandas as pd
import pytest
import torch

from ldae.checkpoints import CHECKPOINT_KEY
from ldae.errors import CheckpointError, LDAEError
from ldae.model import LDAE
from ldae.runs import COMPRESSED_CSV, stage_dir


@pytest.fixture(scope="module")
def model(tiny_run: Path) -> LDAE:
    return LDAE.load(tiny_run, steps=20)


@pytest.fixture(scope="module")
def scans(tiny_run: Path, model: LDAE) -> torch.Tensor:
    df = pd.read_csv(stage_dir(tiny_run, "latents") / COMPRESSED_CSV)
    paths = [stage_dir(tiny_run, "latents") / p for p in df["path"].iloc[:2]]
    return torch.cat([model.load_volume(p)[0] for p in paths])


def test_run_layout_and_checkpoint_contents(tiny_run: Path):
    rep = stage_dir(tiny_run, "representation")
    assert (rep / "checkpoints" / "best.ckpt").is_file() and (rep / "checkpoints" / "ysem_stats.json").is_file()
    assert (rep / "config.yaml").is_file()
    assert list((rep / "figures").glob("recon_epoch*.png"))
    ckpt = torch.load(rep / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    # the frozen UNet is referenced, not copied, into the stage-3 checkpoint
    assert not any(k.startswith("unet.") or "_ldm" in k for k in ckpt["state_dict"])
    assert ckpt[CHECKPOINT_KEY]["stage"] == "representation"
    assert Path(ckpt[CHECKPOINT_KEY]["diffusion_checkpoint"]).is_file()
    metrics = pd.read_csv(rep / "logs" / "metrics.csv")
    assert {"val/ssim_semantic", "val/ssim_encoded", "val/loss"} <= set(metrics.columns)


def test_checkpoints_name_their_upstream_stages_relative_to_themselves(tiny_run: Path, model: LDAE):
    """Stage 2 names its autoencoder, stage 3 its diffusion model and autoencoder: absolute path, path
    relative to the naming checkpoint's folder, and the weights fingerprint of what was loaded."""
    from ldae.checkpoints import FORMAT, StageMetadata, load_autoencoder, load_latent_diffusion
    from ldae.nets.weights import weights_fingerprint

    def meta(stage: str) -> StageMetadata:
        ckpt = torch.load(stage_dir(tiny_run, stage) / "checkpoints" / "best.ckpt", weights_only=True)
        return StageMetadata.from_dict(ckpt[CHECKPOINT_KEY])

    ae_ckpt = stage_dir(tiny_run, "autoencoder") / "checkpoints" / "best.ckpt"
    ldm_ckpt = stage_dir(tiny_run, "diffusion") / "checkpoints" / "best.ckpt"
    ae_fp = weights_fingerprint(load_autoencoder(ae_ckpt)[0])
    ldm_fp = weights_fingerprint(load_latent_diffusion(ldm_ckpt).unet)
    ldm_meta, rep_meta = meta("diffusion"), meta("representation")
    assert ldm_meta.format == rep_meta.format == FORMAT == 2
    sibling = str(Path("..", "..", "{}", "checkpoints", "best.ckpt"))
    assert ldm_meta.upstream["autoencoder"].relative == sibling.format("autoencoder")
    assert ldm_meta.upstream["autoencoder"].fingerprint == ae_fp
    assert Path(ldm_meta.upstream["autoencoder"].path) == ae_ckpt.resolve()
    assert rep_meta.upstream["diffusion"].relative == sibling.format("diffusion")
    assert rep_meta.upstream["diffusion"].fingerprint == ldm_fp
    assert rep_meta.upstream["autoencoder"].relative == sibling.format("autoencoder")
    assert rep_meta.upstream["autoencoder"].fingerprint == ae_fp
    # the loaded model carries the same fingerprints and the metadata it read
    assert model.fingerprints["autoencoder"] == ae_fp and model.fingerprints["diffusion"] == ldm_fp
    assert model.metadata["representation"] == rep_meta


def test_frozen_unet_stays_in_eval_mode(tiny_run: Path):
    from ldae.config import load_preset
    from ldae.runs import find_checkpoint
    from ldae.training.representation import RepresentationModule

    cfg = load_preset("tiny", "representation")
    cfg["out"] = str(tiny_run / "scratch")
    module = RepresentationModule(cfg, str(find_checkpoint(tiny_run, "diffusion")))
    module.train()
    assert module.encoder.training and module.shift.training
    assert not module.unet.training
    assert not any(m.training for m in module.unet.modules())
    assert all(not p.requires_grad for p in module.unet.parameters())
    assert not module.ema_encoder.module.training


def test_encode_decode_roundtrip_recovers_latent(model: LDAE, scans: torch.Tensor):
    z0 = model.compress(scans)
    y, z_T = model.encode(scans, steps=50)
    assert y.shape == (2, model.encoder.emb_dim) and z_T.shape == z0.shape
    z_rec = model.decode_latent(y, z_T, steps=50)
    rel = float((z_rec - z0).pow(2).mean().sqrt() / z0.std())
    assert rel < 0.2, rel
    assert torch.isfinite(z_T).all()


def test_interpolate_endpoints_are_reconstructions(model: LDAE, scans: torch.Tensor):
    x1, x2 = scans[:1], scans[1:2]
    out = model.interpolate(x1, x2, [0.0, 0.5, 1.0], steps=10)
    assert out.shape == (3, 1, 1, *model.shape)
    torch.testing.assert_close(out[0], model.reconstruct(x1, steps=10))
    torch.testing.assert_close(out[2], model.reconstruct(x2, steps=10))
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_variations_and_manipulation(model: LDAE, scans: torch.Tensor):
    v = model.variations(scans[:1], n=2, steps=10, seed=1)
    assert v.shape == (2, 1, 1, *model.shape)
    assert float((v[0] - v[1]).abs().max()) > 0  # new noise, new sample
    d = torch.randn(model.encoder.emb_dim)
    m = model.manipulate(scans[:1], d, [0.0, 3.0], steps=10)
    torch.testing.assert_close(m[0], model.reconstruct(scans[:1], steps=10), atol=1e-4, rtol=1e-4)
    with pytest.raises(LDAEError, match="direction has"):
        model.manipulate(scans[:1], torch.ones(3), [1.0])
    with pytest.raises(LDAEError, match="expected volumes of shape"):
        model.encode(torch.zeros(1, 1, 8, 8, 8))


def test_generate_and_semantic_only(model: LDAE, scans: torch.Tensor):
    g = model.generate(2, steps=5, seed=0)
    assert g.shape == (2, 1, *model.shape)
    s = model.semantic_only(scans[:1], steps=5)
    assert s.shape == (1, 1, *model.shape)
    # y_sem given explicitly: its own code reproduces the default, another scan's code changes the output
    torch.testing.assert_close(model.semantic_only(scans[:1], steps=5, y_sem=model.semantic(scans[:1])), s)
    other = model.semantic_only(scans[:1], steps=5, y_sem=model.semantic(scans[1:2]))
    assert (other - s).abs().max() > 1e-6


def test_guidance_scale_comes_from_the_run_and_scales_the_decodings_from_random_z_T(model: LDAE, scans: torch.Tensor,
                                                                               tiny_run: Path):
    from ldae.checkpoints import open_checkpoint
    from ldae.diffusion.ddim import ddim_invert, ddim_sample
    from ldae.diffusion.pdae import guided_eps_fn, run_guidance_scale
    from ldae.runs import find_checkpoint

    rep = open_checkpoint(find_checkpoint(tiny_run, "representation"), "representation")
    assert model.guidance_scale == run_guidance_scale(rep.config, "run")  # the run's decoding.guidance_scale
    strong = LDAE.load(tiny_run, steps=20, guidance_scale=3.0)
    paper = LDAE.load(tiny_run, steps=20, guidance_scale=1.0)
    assert strong.guidance_scale == 3.0 and paper.guidance_scale == 1.0
    x = scans[:1]
    y = strong.semantic(x)
    eps3 = guided_eps_fn(strong.unet, strong.shift, strong.schedule, y, 3.0)
    # decodings from a random z_T are the DDIM of ε̂ with the shift scaled by 3
    z_T = strong._noise(1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(strong.semantic_only(x, steps=5), strong.decompress(ddim_sample(eps3, z_T, strong.schedule, 5)))
    torch.testing.assert_close(strong.variations(x, 1, steps=5)[0], strong.semantic_only(x, steps=5))
    torch.testing.assert_close(strong.generate(1, steps=5, y_sem=y), strong.semantic_only(x, steps=5))
    assert (strong.semantic_only(x, steps=5) - paper.semantic_only(x, steps=5)).abs().max() > 1e-6
    # decodings of an inverted z_T keep the paper's s = 1 whatever the model's scale
    z_inv = ddim_invert(guided_eps_fn(strong.unet, strong.shift, strong.schedule, y), strong.compress(x), strong.schedule, 5)
    assert torch.equal(strong.encode(x, 5)[1], z_inv) and torch.equal(strong.encode(x, 5)[1], paper.encode(x, 5)[1])
    assert torch.equal(strong.reconstruct(x, 5), paper.reconstruct(x, 5))
    torch.testing.assert_close(strong.decode(y, z_inv, 5, guidance_scale=3.0),
                               strong.decompress(ddim_sample(eps3, z_inv, strong.schedule, 5)))
    with pytest.raises(LDAEError, match="guidance_scale: expected a guidance scale > 0"):
        LDAE.load(tiny_run, guidance_scale=0.0)


def test_load_errors(tmp_path: Path, tiny_run: Path):
    with pytest.raises(CheckpointError, match="no representation checkpoint"):
        LDAE.load(tmp_path)
    from ldae.checkpoints import load_representation
    from ldae.runs import find_checkpoint

    with pytest.raises(CheckpointError, match="expected stage 'representation'"):
        load_representation(find_checkpoint(tiny_run, "diffusion"))


@pytest.mark.parametrize("bad", [0, 1.5, True])
def test_bad_repeats_named_before_anything_is_read(bad) -> None:
    from ldae.config import load_preset
    from ldae.errors import ConfigError
    from ldae.training.representation import fit

    cfg = load_preset("tiny", "representation")
    cfg["diffusion_checkpoint"], cfg["data"]["csv"] = "/nonexistent/best.ckpt", "/nonexistent.csv"
    cfg["loss"]["repeats"] = bad
    with pytest.raises(ConfigError, match=r"loss.repeats': expected an integer >= 1, got " + repr(bad).replace(".", r"\.")):
        fit(cfg)


def test_ema_encoder_codes_are_standardised_on_the_training_split(tiny_run: Path):
    """The saved (EMA) encoder's CodeNorm statistics are those of its own codes on the training split
    (calibrated at validation), not buffers copied from the trained encoder: y_sem of the training scans
    (ysem_stats.json) has mean 0 and population std sqrt((n-1)/n · var/(var + eps)) per dimension."""
    import json

    ckpt = stage_dir(tiny_run, "representation") / "checkpoints" / "best.ckpt"
    stats = json.loads((ckpt.parent / "ysem_stats.json").read_text())
    n, mean, std = stats["n"], torch.tensor(stats["mean"]), torch.tensor(stats["std"], dtype=torch.float64)
    var = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"][
        "ema_encoder.module.out_norm.running_var"].double()
    assert n >= 10
    assert mean.abs().max() < 1e-3
    torch.testing.assert_close(std, torch.sqrt((n - 1) / n * var / (var + 1e-5)), atol=1e-4, rtol=1e-3)


def test_latent_readout_loss_is_the_unexplained_variance_fraction() -> None:
    """Against closed forms: W = 0 leaves all of the variation (1); the least-squares map with an intercept
    (torch.linalg.lstsq on [y, 1]) leaves 1 − R² of ordinary regression, and the loss with that slope
    equals it (the centring stands in for the intercept); a code that holds the latent exactly leaves none;
    a constant offset of the latents or of y_sem changes nothing."""
    from ldae.training.representation import latent_readout_loss

    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(32, 2, 3, 2, 2, generator=gen) * torch.linspace(0.1, 2.0, 24).reshape(1, 2, 3, 2, 2) + 0.7
    flat = z0.flatten(1)
    y = torch.randn(32, 5, generator=gen)
    readout = torch.nn.Linear(5, 24, bias=False)
    with torch.no_grad():
        readout.weight.zero_()
    assert latent_readout_loss(readout, y, z0).item() == pytest.approx(1.0, rel=1e-6)

    design = torch.cat([y, torch.ones(32, 1)], dim=1).double()
    coef = torch.linalg.lstsq(design, flat.double()).solution
    with torch.no_grad():
        readout.weight.copy_(coef[:5].T.float())
    resid = flat.double() - design @ coef
    expected = (resid.pow(2).sum() / (flat.double() - flat.double().mean(0)).pow(2).sum()).item()
    assert 0.3 < expected < 1.0
    assert latent_readout_loss(readout, y, z0).item() == pytest.approx(expected, rel=1e-4)
    assert latent_readout_loss(readout, y + 3.0, z0 - 5.0).item() == pytest.approx(expected, rel=1e-4)

    exact = torch.nn.Linear(24, 24, bias=False)
    with torch.no_grad():
        exact.weight.copy_(torch.eye(24))
    assert latent_readout_loss(exact, flat, z0).item() < 1e-10


@pytest.mark.parametrize("bad", [-0.1, True, "x", float("nan")])
def test_bad_latent_readout_named_before_anything_is_read(bad) -> None:
    from ldae.config import load_preset
    from ldae.errors import ConfigError
    from ldae.training.representation import fit

    cfg = load_preset("tiny", "representation")
    cfg["diffusion_checkpoint"], cfg["data"]["csv"] = "/nonexistent/best.ckpt", "/nonexistent.csv"
    cfg["loss"]["latent_readout"] = bad
    with pytest.raises(ConfigError, match=r"loss.latent_readout': expected a number >= 0, got "):
        fit(cfg)


@pytest.mark.parametrize("bad", [0, -1.0, True, "x", float("inf")])
def test_bad_guidance_scale_named_before_anything_is_read(bad) -> None:
    from ldae.config import load_preset
    from ldae.errors import ConfigError
    from ldae.training.representation import fit

    cfg = load_preset("tiny", "representation")
    cfg["diffusion_checkpoint"], cfg["data"]["csv"] = "/nonexistent/best.ckpt", "/nonexistent.csv"
    cfg["decoding"]["guidance_scale"] = bad
    with pytest.raises(ConfigError, match=r"config key 'decoding.guidance_scale': expected a guidance scale > 0"):
        fit(cfg)


def test_training_step_adds_the_weighted_latent_readout(tiny_run: Path, model: LDAE, scans: torch.Tensor) -> None:
    """With ``loss.latent_readout`` = λ the step's loss is the PDAE loss plus λ times the read-out loss of
    the same y_sem (recomputed here with the same draws); the read-out map starts at zero (loss exactly 1)
    and gets a gradient; it is not part of the weights inference loads; λ = 0 builds no read-out at all."""
    import warnings

    from ldae.config import load_preset
    from ldae.diffusion.pdae import pdae_loss
    from ldae.runs import find_checkpoint
    from ldae.training.representation import RepresentationModule, latent_readout_loss

    cfg = load_preset("tiny", "representation")
    cfg["out"] = str(tiny_run / "scratch")
    diffusion = str(find_checkpoint(tiny_run, "diffusion"))
    assert RepresentationModule(cfg, diffusion).latent_readout is None
    cfg["loss"]["latent_readout"] = 0.25
    module = RepresentationModule(cfg, diffusion)
    module.on_fit_start()
    module.train()
    with torch.no_grad():
        latent = model.compress(scans) / module.scale_factor
    batch = {"image": scans, "latent": latent}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        torch.manual_seed(5)
        loss = module.training_step(batch, 0)
    torch.manual_seed(5)
    z0 = latent * module.scale_factor
    y = module.encoder(scans)
    pdae = pdae_loss(module.unet, module.shift, module.schedule, z0, y, module.gamma, repeats=module.repeats)
    readout = latent_readout_loss(module.latent_readout, y, z0)
    assert readout.item() == pytest.approx(1.0, abs=1e-6)
    assert loss.item() == pytest.approx(pdae.item() + 0.25 * readout.item(), rel=1e-5)
    loss.backward()
    assert module.latent_readout.weight.grad is not None and module.latent_readout.weight.grad.abs().sum() > 0
    assert not any(k.startswith("latent_readout") for k in module.ema_encoder.state_dict())
    assert any(k.startswith("latent_readout.") for k in module.state_dict())
