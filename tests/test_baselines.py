"""Baselines (paper tables 5 and 7): the voxel-space diffusion autoencoder and the supervised encoder.

Independent references: the conditional UNet with its y-projections zeroed must equal
:class:`ldae.nets.unet.LatentUNet` with the same weights; parameter counts follow a closed form; the
supervised loss equals a hand-written binary cross-entropy; DDIM round trips get better with more steps
and beat decoding from random noise."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from ldae.baselines.supervised import SupervisedNet, load_supervised
from ldae.baselines.voxel_dae import (
    ConditionalUNet,
    VoxelDAE,
    VoxelDAENet,
    build_network,
    load_voxel_dae,
    parameter_counts,
)
from ldae.cli import main
from ldae.config import apply_overrides, get_dotted, load_preset
from ldae.data.cohort import read_cohort
from ldae.data.phantom import phantom_volume, write_phantom_cohort
from ldae.diffusion.schedule import NoiseSchedule
from ldae.errors import CheckpointError, ConfigError
from ldae.nets.semantic_encoder import build_semantic_encoder
from ldae.nets.unet import LatentUNet, ResBlock
from ldae.training.supervised import age_statistics, supervised_loss

SHAPE = (16, 20, 16)
SMALL_UNET = {"in_channels": 1, "channels": [8, 16], "num_res_blocks": 1, "attention_factors": [],
              "num_heads": 2, "norm_num_groups": 4, "dropout": 0.0}
SMALL_ENC = {"backbone": "small_cnn", "widths": [8, 16], "emb_dim": 32, "num_heads": 4, "num_slices": SHAPE[-1]}
SMALL_OVERRIDES = [
    "--data.shape", "[16, 20, 16]", "--data.batch_size", "4",
    "--model.semantic_encoder.widths", "[8, 16]", "--model.semantic_encoder.emb_dim", "32",
    "--model.semantic_encoder.num_slices", "16",
    "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1",
    "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
]
VOXEL_OVERRIDES = [
    "--model.unet.channels", "[8, 16]", "--model.unet.attention_factors", "[]", "--model.unet.num_heads", "2",
    "--model.unet.norm_num_groups", "4", "--validation.ddim_steps", "3", "--inference.ddim_steps", "5",
]


def _perturb_(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Add noise to every parameter (the zero-initialised output layers included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _volumes(severities: list[float], seed: int = 0) -> torch.Tensor:
    return torch.stack([torch.from_numpy(phantom_volume(SHAPE, s, seed=seed + i))[None]
                        for i, s in enumerate(severities)])


# ---------------------------------------------------------------- voxel DAE: network


def test_conditional_unet_without_y_equals_latent_unet():
    """With the y-projections zeroed, the conditional UNet is exactly the (independently written) LatentUNet."""
    cfg = {**SMALL_UNET, "attention_factors": [2]}  # attention inside the level blocks too
    ref = LatentUNet(**cfg)
    _perturb_(ref)
    unet = ConditionalUNet(cfg, cond_dim=5)
    result = unet.load_state_dict(ref.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(".cond_proj." in k for k in result.missing_keys)
    n_res = sum(isinstance(m, ResBlock) for m in unet.modules())
    assert len(result.missing_keys) == 2 * n_res  # every ResBlock (weight + bias), encoder path included
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".cond_proj." in name:
                p.zero_()
    x, t = torch.randn(2, 1, *SHAPE), torch.tensor([3, 700])
    with torch.no_grad():
        expected = ref(x, t)
        for y in (torch.zeros(2, 5), torch.randn(2, 5)):
            torch.testing.assert_close(unet(x, t, y), expected, rtol=1e-5, atol=1e-6)


def test_conditional_unet_output_depends_on_y_through_every_level():
    unet = ConditionalUNet(SMALL_UNET, cond_dim=6).eval()
    x, t = torch.randn(2, 1, *SHAPE), torch.tensor([10, 500])
    y1, y2 = torch.randn(2, 6), torch.randn(2, 6)
    with torch.no_grad():  # zero-initialised output layer and residual branches: ε ≡ 0 at init
        assert unet(x, t, y1).abs().max() == 0
    _perturb_(unet)
    with torch.no_grad():
        a, b = unet(x, t, y1), unet(x, t, y2)
        torch.testing.assert_close(unet(x, t, y1), a)  # deterministic
    assert (a - b).abs().max() > 1e-3 * a.abs().max()
    y = y1.clone().requires_grad_(True)
    unet(x, t, y).square().sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    encoder_path = [m for m in unet.input_blocks.modules() if isinstance(m, ResBlock)]
    assert encoder_path and all(m.cond_proj.weight.grad.abs().sum() > 0 for m in encoder_path)


def test_parameter_counts_closed_form():
    """Conditional UNet = LatentUNet + one Linear(cond_dim -> out_ch) per ResBlock; paper preset on the meta device."""
    cfg = load_preset("paper", "voxel_dae")
    counts = parameter_counts(cfg)
    unet_cfg, emb = cfg["model"]["unet"], cfg["model"]["semantic_encoder"]["emb_dim"]
    chans, nrb = unet_cfg["channels"], unet_cfg["num_res_blocks"]
    res_out = [c for c in chans for _ in range(nrb)] + [chans[-1]] * 2 + [c for c in chans for _ in range(nrb + 1)]
    with torch.device("meta"):
        base = sum(p.numel() for p in LatentUNet(**unet_cfg).parameters())
        enc = sum(p.numel() for p in build_semantic_encoder(cfg["model"]["semantic_encoder"], False).parameters())
    assert counts["unet"] == base + sum((emb + 1) * c for c in res_out)
    assert counts["semantic_encoder"] == enc
    assert counts["total"] == counts["unet"] + counts["semantic_encoder"]
    tiny = parameter_counts(load_preset("tiny", "voxel_dae"))
    assert tiny["total"] < counts["total"] / 50


@pytest.mark.parametrize("preset", ["paper", "small", "tiny"])
def test_baselines_use_ldae_encoder_and_grid(preset: str):
    """Fair baselines: the same encoder config and image grid as the LDAE stages of the same preset."""
    rep = load_preset(preset, "representation")["model"]["semantic_encoder"]
    ae = load_preset(preset, "autoencoder")["data"]
    for stage in ("voxel_dae", "supervised"):
        cfg = load_preset(preset, stage)
        assert cfg["stage"] == stage and cfg["preset"] == preset
        assert cfg["model"]["semantic_encoder"] == rep
        assert cfg["data"]["shape"] == ae["shape"] and cfg["data"]["spacing"] == ae["spacing"]


def test_config_errors_name_the_key():
    cfg = load_preset("tiny", "voxel_dae")
    with pytest.raises(ConfigError, match="num_slices"):
        build_network(apply_overrides(cfg, [("model.semantic_encoder.num_slices", 16)]))
    with pytest.raises(ConfigError, match="model.unet.in_channels"):
        build_network(apply_overrides(cfg, [("model.unet.in_channels", 3)]))
    from ldae.training import supervised, voxel_dae

    with pytest.raises(ConfigError, match="data.csv"):
        voxel_dae.fit(cfg)
    bad = apply_overrides(load_preset("tiny", "supervised"), [("data.csv", "x.csv"), ("loss.positive", "Alzheimer")])
    with pytest.raises(ConfigError, match="loss.positive"):
        supervised.fit(bad)


# ---------------------------------------------------------------- voxel DAE: training and round trips


@pytest.fixture(scope="module")
def trained_voxel_dae() -> dict:
    """A small voxel DAE trained 30 Adam steps on 4 phantoms, with its loss before/after (fixed noise)."""
    torch.manual_seed(0)
    net = VoxelDAENet(build_semantic_encoder(SMALL_ENC), ConditionalUNet(SMALL_UNET, SMALL_ENC["emb_dim"]))
    schedule = NoiseSchedule()
    x = _volumes([0.0, 1.0, 0.0, 1.0])

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(sum(net.loss(x, schedule, torch.Generator().manual_seed(k)) for k in range(4)) / 4)

    before = fixed_loss()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(30):
        net.loss(x, schedule).backward()
        opt.step()
        opt.zero_grad()
    after = fixed_loss()
    model = VoxelDAE(net=net.eval(), schedule=schedule, spacing=6.0, shape=SHAPE, steps=10, cfg={})
    return {"model": model, "x": x, "before": before, "after": after}


def test_training_lowers_the_loss(trained_voxel_dae: dict):
    assert trained_voxel_dae["before"] == pytest.approx(1.0, abs=0.1)  # ε ≡ 0 at init: loss = E[ε²] = 1
    assert trained_voxel_dae["after"] < 0.5 * trained_voxel_dae["before"]


def test_encode_decode_round_trip(trained_voxel_dae: dict):
    model, x = trained_voxel_dae["model"], trained_voxel_dae["x"][:2]
    y, x_T = model.encode(x, steps=40)
    assert y.shape == (2, SMALL_ENC["emb_dim"]) and x_T.shape == x.shape
    mse_40 = float((model.decode(y, x_T, steps=40) - x).pow(2).mean())
    mse_8 = float((model.reconstruct(x, steps=8) - x).pow(2).mean())
    mse_random = float((model.decode(y, torch.randn(x.shape, generator=torch.Generator().manual_seed(0)),
                                     steps=40) - x).pow(2).mean())
    assert mse_40 < 0.5 * mse_8  # the inversion error shrinks with the step size
    assert mse_40 < 0.1 * mse_random  # x_T carries the scan: far better than decoding from random noise
    assert mse_40 < 0.01
    out = model.reconstruct(x, steps=4)
    assert out.min() >= 0 and out.max() <= 1
    with pytest.raises(Exception, match=r"expected volumes of shape \(B, 1, 16, 20, 16\)"):
        model.semantic(torch.rand(1, 1, 8, 8, 8))


# ---------------------------------------------------------------- supervised encoder


def test_supervised_loss_matches_hand_written_bce():
    logit = torch.tensor([2.0, -1.0, 0.5, 3.0])
    age_pred, age = torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([0.0, 0.0, 1.0, -1.0])
    is_pos = torch.tensor([1.0, 0.0, 0.0, 1.0])
    labelled = torch.tensor([True, True, False, True])  # row 2 is MCI: no classification loss
    total, cls, age_loss = supervised_loss(logit, age_pred, is_pos, labelled, age, age_weight=0.5)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    bce = -(math.log(sig(2.0)) + math.log(1 - sig(-1.0)) + math.log(sig(3.0))) / 3
    mse = (0.1**2 + 0.2**2 + 0.7**2 + 1.0**2) / 4
    assert float(cls) == pytest.approx(bce, rel=1e-6)
    assert float(age_loss) == pytest.approx(mse, rel=1e-6)
    assert float(total) == pytest.approx(bce + 0.5 * mse, rel=1e-6)
    none = torch.zeros(4, dtype=torch.bool)  # an all-MCI batch: age only
    assert float(supervised_loss(logit, age_pred, is_pos, none, age, 0.5)[1]) == 0.0
    assert age_statistics([70.0, 80.0]) == (75.0, 5.0) and age_statistics([70.0]) == (70.0, 1.0)


def test_supervised_encoder_learns_planted_severity():
    """AD phantoms have larger 'ventricles': a few steps reach perfect training accuracy."""
    torch.manual_seed(0)
    net = SupervisedNet(build_semantic_encoder(SMALL_ENC))
    severities = [0.0, 1.0] * 4
    x = _volumes(severities, seed=10)
    is_pos = torch.tensor(severities)
    labelled = torch.ones(8, dtype=torch.bool)
    age = torch.zeros(8)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        _, logit, age_pred = net(x)
        loss = supervised_loss(logit, age_pred, is_pos, labelled, age, 0.0)[0]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    net.eval()
    with torch.no_grad():
        emb, logit, _ = net(x)
        held_out = net(_volumes([0.0, 1.0, 0.0, 1.0], seed=50))[1]
    assert emb.shape == (8, SMALL_ENC["emb_dim"])
    assert losses[-1] < 0.25 * losses[0]
    assert torch.equal((logit > 0).float(), is_pos)
    assert torch.equal((held_out > 0).float(), torch.tensor([0.0, 1.0, 0.0, 1.0]))


# ---------------------------------------------------------------- fits and checkpoints


@pytest.fixture(scope="module")
def small_fits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """1-epoch fits of both baselines (tiny presets shrunk to 16×20×16) through `ldae fit`."""
    root = tmp_path_factory.mktemp("baselines")
    csv = write_phantom_cohort(root / "cohort", n_subjects=6, sessions=(0, 12), shape=SHAPE, spacing=6.0, seed=0)
    out = {"csv": csv}
    for stage, extra in (("voxel_dae", VOXEL_OVERRIDES), ("supervised", [])):
        run = root / stage
        args = ["fit", "--preset", "tiny", "--stage", stage, "--data.csv", str(csv), "--out", str(run),
                *SMALL_OVERRIDES, *extra]
        assert main(args) == 0
        out[stage] = run
    return out


def test_voxel_dae_checkpoint_round_trip(small_fits: dict[str, Path]):
    run = small_fits["voxel_dae"]
    best = run / "checkpoints" / "best.ckpt"
    assert (run / "checkpoints" / "last.ckpt").is_file() and list((run / "figures").glob("recon_epoch*.png"))
    metrics = pd.read_csv(run / "logs" / "metrics.csv")
    assert {"val/loss", "val/ssim_encoded", "val/ssim_semantic", "val/mse_encoded"} <= set(metrics.columns)
    assert metrics["val/ssim_encoded"].dropna().between(-1, 1).all()
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert ckpt["ldae"]["stage"] == "voxel_dae" and ckpt["ldae"]["shape"] == list(SHAPE)
    model = load_voxel_dae(best)
    assert model.steps == 5 and model.shape == SHAPE and not model.net.training
    state = model.net.state_dict()
    assert all(torch.equal(v, ckpt["state_dict"]["ema.module." + k]) for k, v in state.items())
    raw = load_voxel_dae(best, ema=False).net.state_dict()
    assert all(torch.equal(v, ckpt["state_dict"]["net." + k]) for k, v in raw.items())
    x, _ = model.load_volume(read_cohort(small_fits["csv"])["path"].iloc[0])
    assert x.shape == (1, 1, *SHAPE)
    torch.testing.assert_close(model.reconstruct(x), model.reconstruct(x))  # deterministic DDIM
    with pytest.raises(CheckpointError, match="stage 'voxel_dae', expected stage 'supervised'"):
        load_supervised(best)


def test_supervised_checkpoint_round_trip(small_fits: dict[str, Path]):
    run = small_fits["supervised"]
    best = run / "checkpoints" / "best.ckpt"
    metrics = pd.read_csv(run / "logs" / "metrics.csv")
    assert {"val/loss", "val/loss_cls", "val/age_mae"} <= set(metrics.columns)
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    meta = ckpt["ldae"]
    cohort = pd.read_csv(small_fits["csv"])
    assert meta["positive"] == "AD" and meta["negative"] == "CN"
    model = load_supervised(best)
    x = torch.rand(3, 1, *SHAPE)
    emb = model.semantic(x)
    assert emb.shape == (3, 32)
    torch.testing.assert_close(emb, model.net.encoder(x))
    p, age = model.predict(x)
    assert ((p >= 0) & (p <= 1)).all()
    # the age head de-standardises with the training split's statistics
    assert model.age_std > 0 and cohort["age"].min() - 1 <= model.age_mean <= cohort["age"].max() + 1
    assert torch.isfinite(age).all()
    with pytest.raises(CheckpointError, match="stage 'supervised', expected stage 'voxel_dae'"):
        load_voxel_dae(best)


def test_fit_registry_and_print_config(capsys: pytest.CaptureFixture[str]):
    from ldae.training import STAGE_MODULES

    assert STAGE_MODULES["voxel_dae"] == "ldae.training.voxel_dae"
    assert STAGE_MODULES["supervised"] == "ldae.training.supervised"
    assert main(["fit", "--preset", "tiny", "--stage", "voxel_dae", "--print-config"]) == 0
    assert "stage: voxel_dae" in capsys.readouterr().out


@pytest.mark.parametrize("stage", [pytest.param("voxel_dae", marks=pytest.mark.slow), "supervised"])
def test_tiny_preset_fits_one_epoch(tmp_path: Path, phantom_cohort: Path, stage: str):
    """`ldae fit --preset tiny` unchanged (32×40×32 grid) for one epoch on a phantom cohort."""
    out = tmp_path / stage
    args = ["fit", "--preset", "tiny", "--stage", stage, "--data.csv", str(phantom_cohort), "--out", str(out),
            "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1",
            "--trainer.enable_progress_bar", "false"]
    assert main(args) == 0
    assert (out / "checkpoints" / "best.ckpt").is_file()
    cfg = load_preset("tiny", stage)
    assert get_dotted(cfg, "data.shape") == [32, 40, 32]
