"""Stage 2: EMA math, frozen modules stay in eval mode, training lowers the loss, a real fit writes EMA
checkpoints with the scale factor, and `ldae generate` decodes samples to NIfTI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ldae.checkpoints import load_latent_diffusion
from ldae.cli import main
from ldae.config import load_preset
from ldae.data.geometry import MNI_BRAIN_CENTRE, model_grid_affine
from ldae.data.latents import read_latent_meta
from ldae.errors import CheckpointError, CohortError, ConfigError
from ldae.training.ema import EMA, FrozenEvalMixin, freeze
from ldae.training.latent_diffusion import LatentDiffusionModule, fit

LATENT = [3, 8, 10, 8]
SMALL_UNET = {"channels": [8, 16], "num_res_blocks": 1, "attention_factors": [2], "num_heads": 2,
              "norm_num_groups": 4}
AE_MODEL = {"channels": [8, 8], "latent_channels": 3, "num_res_blocks": 1, "norm_num_groups": 4}
AE_SHAPE = [16, 20, 16]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is as fast, and avoids OpenMP contention when other jobs share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- EMA and frozen modules


def test_ema_matches_closed_form():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9)
    values = [3.0, -1.0, 2.0, 5.0]
    for v in values:
        with torch.no_grad():
            model.weight.fill_(v)
        ema.update(model)
    # θ_n = d^n θ_0 + Σ_k (1-d) d^(n-k) v_k
    expected = 0.9**4 * 1.0 + sum(0.1 * 0.9 ** (3 - k) * v for k, v in enumerate(values))
    assert float(ema.module.weight[0, 0]) == pytest.approx(expected, rel=1e-6)
    assert int(ema.num_updates) == 4
    target = nn.Linear(2, 1, bias=False)
    ema.copy_to(target)
    assert torch.equal(target.weight, ema.module.weight)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_warmup_decay_sequence():
    model = nn.Linear(1, 1)
    ema = EMA(model, decay=0.999, warmup=True)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update(model)
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    assert EMA(model, decay=0.999).current_decay() == 0.999


class _Frozen(FrozenEvalMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = freeze(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)))
        self.head = nn.Linear(4, 1)
        self.modes: list[tuple[bool, bool]] = []

    def training_step(self, batch, batch_idx):
        self.modes.append((self.frozen.training, self.frozen[1].training))
        return self.head(self.frozen(batch[0])).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/x", self.head(self.frozen(batch[0])).mean())

    def on_train_epoch_start(self) -> None:
        self.train()  # what older Lightning versions / user code do: must not unfreeze

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


def test_frozen_module_stays_eval_during_lightning_training(tmp_path):
    data = torch.utils.data.TensorDataset(torch.randn(8, 4))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    module = _Frozen()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader, loader)
    assert len(module.modes) == 4 and not any(a or b for a, b in module.modes)
    assert module.head.training and not module.frozen.training
    # the pitfall being guarded against: a plain parent's train() switches a frozen child back on
    plain = nn.Module()
    plain.child = freeze(nn.Dropout(0.5))
    plain.train()
    assert plain.child.training


# ---------------------------------------------------------------- training on random latents


def _diffusion_cfg(tmp_path: Path, csv: Path | None = None) -> dict:
    cfg = load_preset("tiny", "diffusion")
    cfg["out"] = str(tmp_path / "diffusion")
    cfg["data"]["csv"] = str(csv) if csv else None
    cfg["model"].update(SMALL_UNET)
    return cfg


def test_training_lowers_the_loss(tmp_path):
    cfg = _diffusion_cfg(tmp_path)
    module = LatentDiffusionModule(cfg, scale_factor=0.5, latent_shape=[3, 4, 5, 4])
    gen = torch.Generator().manual_seed(0)
    latents = 2.0 * torch.randn(64, 3, 4, 5, 4, generator=gen)  # std 2, scale 0.5 -> unit variance
    opt = torch.optim.Adam(module.unet.parameters(), lr=2e-3)

    def eval_loss() -> float:
        module.unet.eval()
        with torch.no_grad():
            value = module.diffusion_loss(module.unet, latents * 0.5, torch.Generator().manual_seed(1))
        module.unet.train()
        return float(value)

    before = eval_loss()
    for _ in range(60):
        idx = torch.randint(0, 64, (16,), generator=gen)
        loss = module.diffusion_loss(module.unet, latents[idx] * module.scale_factor)
        opt.zero_grad()
        loss.backward()
        opt.step()
        module.ema.update(module.unet)
    after = eval_loss()
    # zero-initialised output: loss starts at E[ε²] = 1; the Bayes optimum for N(0, I) data is E_t[ᾱ_t]
    optimum = float(module.schedule.alphas_cumprod.mean())
    print(f"loss before {before:.3f}, after {after:.3f}, Bayes optimum {optimum:.3f}")
    assert before == pytest.approx(1.0, abs=0.1)
    assert after < 0.7 and after > optimum - 0.1


# ---------------------------------------------------------------- full fit + generate


def _write_autoencoder_checkpoint(path: Path) -> None:
    from ldae.checkpoints import AUTOENCODER_PREFIX, save_checkpoint, stage_metadata
    from ldae.nets.autoencoder import build_autoencoder

    cfg = load_preset("tiny", "autoencoder")
    cfg["model"].update(AE_MODEL)
    cfg["data"]["shape"] = AE_SHAPE
    torch.manual_seed(0)
    net = build_autoencoder(cfg["model"])
    state = {AUTOENCODER_PREFIX + k: v for k, v in net.state_dict().items()}
    save_checkpoint(path, state, stage_metadata(cfg, "autoencoder"))


@pytest.fixture(scope="module")
def latent_cohort(tmp_path_factory) -> Path:
    """12 subjects x 2 sessions of random latents (std 2), explicit splits, latent_meta.json, AE checkpoint."""
    root = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    rows = []
    for s in range(12):
        for months in (0, 12):
            name = f"sub-{s:02d}_ses-M{months:02d}"
            (root / f"{name}.nii.gz").write_bytes(b"")  # the cohort's image column must name a file
            np.savez_compressed(root / f"{name}_latent.npz", latent=(2.0 * rng.standard_normal(LATENT)).astype(np.float32))
            split = "train" if s < 9 else ("val" if s < 11 else "test")
            rows.append({"subject": f"sub-{s:02d}", "session": months, "path": f"{name}.nii.gz",
                         "diagnosis": "CN", "age": 70.0, "latent_path": f"{name}_latent.npz", "split": split})
    pd.DataFrame(rows).to_csv(root / "cohort_with_compressed_latent.csv", index=False)
    _write_autoencoder_checkpoint(root / "ae.ckpt")
    (root / "latent_meta.json").write_text(json.dumps(
        {"scale_factor": 0.5, "latent_shape": LATENT, "autoencoder_checkpoint": "ae.ckpt"}))
    return root / "cohort_with_compressed_latent.csv"


def test_read_latent_meta_validates(latent_cohort, tmp_path):
    meta = read_latent_meta(latent_cohort)
    assert meta["scale_factor"] == 0.5 and meta["latent_shape"] == LATENT
    assert meta["autoencoder_checkpoint"] == str((latent_cohort.parent / "ae.ckpt").resolve())
    with pytest.raises(CohortError, match="no latent_meta.json found"):
        read_latent_meta(tmp_path / "cohort.csv")
    (tmp_path / "latent_meta.json").write_text(json.dumps({"scale_factor": -1, "latent_shape": LATENT}))
    with pytest.raises(CohortError, match="'scale_factor'"):
        read_latent_meta(tmp_path / "cohort.csv")


@pytest.fixture(scope="module")
def trained(latent_cohort, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fit")
    cfg = _diffusion_cfg(tmp, latent_cohort)
    cfg["data"].update(batch_size=8, eval_batch_size=8)
    cfg["validation"].update(sample_every_n_epochs=1, n_samples=2, ddim_steps=3)
    cfg["trainer"].update(max_epochs=2, enable_progress_bar=False)
    return fit(cfg)


@pytest.mark.slow
def test_fit_writes_ema_checkpoint_with_scale_factor(trained, latent_cohort):
    out = trained.parent.parent
    assert trained == out / "checkpoints" / "best.ckpt" and (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "figures" / "samples_epoch000.png").is_file() and (out / "figures" / "samples_epoch001.png").is_file()
    metrics = pd.read_csv(out / "logs" / "metrics.csv")
    assert metrics["val/loss"].notna().sum() == 2 and metrics["train/loss_step"].notna().any()
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    meta = ckpt["ldae"]
    assert meta["stage"] == "diffusion" and meta["scale_factor"] == 0.5 and meta["latent_shape"] == LATENT
    assert meta["autoencoder_checkpoint"] == str((latent_cohort.parent / "ae.ckpt").resolve())
    ldm = load_latent_diffusion(trained)
    assert ldm.scale_factor == 0.5 and ldm.latent_shape == tuple(LATENT)
    assert not ldm.unet.training and not any(p.requires_grad for p in ldm.unet.parameters())
    ema = {k[len("ema.module."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.module.")}
    for k, v in ldm.unet.state_dict().items():
        assert torch.equal(v, ema[k]), k  # the loaded UNet holds the EMA weights ...
    raw = ckpt["state_dict"]["unet.input_blocks.1.0.in_conv.weight"]
    assert not torch.equal(raw, ema["input_blocks.1.0.in_conv.weight"])  # ... not the raw ones
    z = ldm.sample(3, steps=4, generator=torch.Generator().manual_seed(0))
    assert z.shape == (3, *LATENT) and torch.isfinite(z).all()
    with pytest.raises(CheckpointError, match="expected stage 'diffusion'"):
        load_latent_diffusion(latent_cohort.parent / "ae.ckpt")


@pytest.mark.slow
def test_resume_requires_flag(trained, latent_cohort):
    cfg = _diffusion_cfg(trained.parent.parent.parent, latent_cohort)
    with pytest.raises(ConfigError, match="--resume"):
        fit(cfg)


@pytest.mark.slow
def test_generate_writes_nifti_and_png(trained, tmp_path, capsys):
    run = trained.parent.parent
    args = ["generate", "--model", str(run), "--n", "2", "--steps", "3", "--seed", "7"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    img = nib.load(tmp_path / "a" / "sample_000.nii.gz")
    assert img.shape == tuple(AE_SHAPE)
    np.testing.assert_allclose(img.affine, model_grid_affine(6.0, AE_SHAPE))
    assert np.allclose(np.diag(img.affine)[:3], 6.0)
    assert (tmp_path / "a" / "samples.png").is_file() and (tmp_path / "a" / "sample_001.nii.gz").is_file()
    same = nib.load(tmp_path / "b" / "sample_000.nii.gz").get_fdata()
    np.testing.assert_array_equal(img.get_fdata(), same)  # seeded: reproducible
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--n", "1"]) == 2
    assert "no diffusion checkpoint" in capsys.readouterr().err


def test_generated_volumes_lie_on_the_model_grid():
    """Generated volumes get the model's grid (MNI brain centre at the grid's centre), the grid every input
    is resampled onto, so they overlay real model-ready scans."""
    a = model_grid_affine(1.5, [128, 160, 128])
    centre = a @ np.array([63.5, 79.5, 63.5, 1.0])
    assert np.allclose(centre[:3], MNI_BRAIN_CENTRE) and math.isclose(a[0, 0], 1.5)
