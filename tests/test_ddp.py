"""Lightning DDP on CPU (gloo, 2 processes): one optimisation step where each process gets half of a fixed
global batch gives the same gradients and weights as one process on the whole batch, and the run writes
exactly one best.ckpt / last.ckpt. Checked for stage 1 (manual optimisation with two optimisers, generator
and discriminator both stepping), stage 2 (automatic optimisation) and stage 3 (semantic encoder + shift
decoder on the frozen UNet).

DDP averages gradients, so equal halves of a mean loss reproduce the full-batch mean gradient, provided
the randomness of a step does not depend on how the batch is split. The helper script below makes it so
(the latent DDPM's timestep and noise are drawn per sample from its cohort index; the autoencoder
decodes its posterior mean) and then calls the real ``ldae`` command line; Lightning's DDP launcher
re-runs that script for rank 1. Each rank dumps the gradients it steps with and its final weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ldae.cli import main
from ldae.data.cohort import read_cohort, write_cohort
from ldae.data.phantom import write_phantom_cohort

HELPER = '''
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
DUMP = Path(os.environ["LDAE_DDP_DUMP"])


def per_sample_training_step(self, batch, batch_idx):
    z0 = batch["latent"] * self.scale_factor
    ts, noises = [], []
    for i in batch["index"].tolist():
        g = torch.Generator().manual_seed(1000 + int(i))
        ts.append(torch.randint(0, self.schedule.T, (1,), generator=g))
        noises.append(torch.randn(tuple(z0.shape[1:]), generator=g))
    t, noise = torch.cat(ts).to(z0.device), torch.stack(noises).to(z0)
    loss = F.mse_loss(self.unet(self.schedule.q_sample(z0, t, noise), t).float(), noise.float())
    self.log("train/loss", loss, batch_size=z0.shape[0])
    return loss


def per_sample_pdae_step(self, batch, batch_idx):
    from ldae.diffusion.pdae import pdae_loss

    z0 = batch["latent"] * self.scale_factor
    y = self.encoder(batch["image"])
    losses = [pdae_loss(self.unet, self.shift, self.schedule, z0[k:k + 1], y[k:k + 1], self.gamma,
                        torch.Generator().manual_seed(1000 + int(i)))
              for k, i in enumerate(batch["index"].tolist())]
    loss = torch.stack(losses).mean()
    self.log("train/loss", loss, batch_size=z0.shape[0])
    return loss


def perturbed_init(init):
    """The shift decoder's zero-initialised output would leave the encoder's gradients exactly zero; its
    dropout (inherited from the diffusion UNet's configuration) is switched off."""
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for m in self.shift.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for net, ema in ((self.encoder, self.ema_encoder), (self.shift, self.ema_shift)):
                for p in net.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
                ema.module.load_state_dict(net.state_dict())
    return wrapped


def remember_batch(self, batch, batch_idx):
    self._batch_indices = batch["index"].tolist()


def dump_grads(self, optimizer):
    rank = self.global_rank
    k = len(list(DUMP.glob(f"grads_rank{rank}_*.pt")))
    grads = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}
    torch.save({"grads": grads, "indices": self._batch_indices}, DUMP / f"grads_rank{rank}_{k}.pt")


def dump_weights(self):
    torch.save({n: t.detach().clone() for n, t in self.state_dict().items()}, DUMP / f"weights_rank{self.global_rank}.pt")


def perturbed(from_config):
    """The UNet's zero-initialised output layers would leave every other gradient exactly zero."""
    def build(cfg):
        net = from_config(cfg)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        return net
    return build


if __name__ == "__main__":
    from monai.networks.nets import AutoencoderKL

    from ldae.cli import main
    from ldae.nets.unet import LatentUNet
    from ldae.training.autoencoder import AutoencoderModule
    from ldae.training.latent_diffusion import LatentDiffusionModule
    from ldae.training.representation import RepresentationModule

    LatentUNet.from_config = staticmethod(perturbed(LatentUNet.from_config))
    LatentDiffusionModule.training_step = per_sample_training_step
    RepresentationModule.training_step = per_sample_pdae_step
    RepresentationModule.__init__ = perturbed_init(RepresentationModule.__init__)
    AutoencoderKL.sampling = lambda self, z_mu, z_sigma: z_mu
    for cls in (LatentDiffusionModule, AutoencoderModule, RepresentationModule):
        cls.on_train_batch_start = remember_batch
        cls.on_before_optimizer_step = dump_grads
        cls.on_train_end = dump_weights
    sys.exit(main(sys.argv[1:]))
'''

COMMON = ["--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
          "--trainer.precision", "32-true", "--trainer.log_every_n_steps", "1"]
STAGES = {
    # 4 train rows = one global batch; dropout off; no sample figures
    "diffusion": ["--model.dropout", "0", "--validation.sample_every_n_epochs", "0"],
    # adversary on from the first step; instance norm: BatchNorm statistics would differ per process on CPU
    # (SyncBatchNorm needs GPUs)
    "autoencoder": ["--loss.adversarial_warmup_epochs", "0", "--discriminator.norm", "INSTANCE"],
    # validate after the one step (best.ckpt), with few DDIM steps; diffusion_checkpoint added per run
    "representation": ["--trainer.check_val_every_n_epoch", "1", "--validation.ddim_steps", "2"],
}
LR = {"diffusion": 5.0e-4, "autoencoder": 1.0e-3, "representation": 3.0e-4}  # tiny presets
LOSS_KEY = {"diffusion": "train/loss", "autoencoder": "train/loss_g_step", "representation": "train/loss"}


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per stage, a cohort CSV with exactly 4 train rows (the global batch) and 2 val rows."""
    root = tmp_path_factory.mktemp("ddp_data")
    rng = np.random.default_rng(0)
    rows = []
    for s in range(6):
        name = f"sub-{s:02d}"
        (root / f"{name}.nii.gz").write_bytes(b"")
        np.savez_compressed(root / f"{name}_latent.npz",
                            latent=(2.0 * rng.standard_normal((3, 8, 10, 8))).astype(np.float32))
        rows.append({"subject": name, "session": 0, "path": f"{name}.nii.gz", "diagnosis": "CN", "age": 70.0,
                     "latent_path": f"{name}_latent.npz", "split": "train" if s < 4 else "val"})
    pd.DataFrame(rows).to_csv(root / "cohort_with_compressed_latent.csv", index=False)
    (root / "latent_meta.json").write_text(json.dumps({"scale_factor": 0.5, "latent_shape": [3, 8, 10, 8]}))
    images = write_phantom_cohort(root / "images", n_subjects=6, sessions=(0,), seed=0)
    df = read_cohort(images)
    df["split"] = ["train"] * 4 + ["val"] * 2
    write_cohort(df, images)
    return {"diffusion": root / "cohort_with_compressed_latent.csv", "autoencoder": images}


@pytest.fixture(scope="module")
def representation_cohort(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Stage 3's (image + latent) cohort of the tiny run cut to 4 train and 2 val rows, and the run's
    diffusion checkpoint."""
    import shutil

    from ldae.runs import COMPRESSED_CSV, LATENT_META, stage_dir

    latents = stage_dir(tiny_run, "latents")
    root = tmp_path_factory.mktemp("ddp_rep")
    df = read_cohort(latents / COMPRESSED_CSV)
    df = pd.concat([df[df["split"] == "train"].iloc[:4], df[df["split"] == "val"].iloc[:2]])
    write_cohort(df, root / COMPRESSED_CSV)
    shutil.copy(latents / LATENT_META, root / LATENT_META)
    return root / COMPRESSED_CSV, stage_dir(tiny_run, "diffusion") / "checkpoints" / "best.ckpt"


def _fit(tmp_path: Path, stage: str, csv: Path, devices: int, extra: tuple[str, ...] = ()) -> tuple[Path, Path]:
    script = tmp_path / "ddp_fit.py"
    script.write_text(HELPER)
    dump, out = tmp_path / f"dump{devices}", tmp_path / f"run{devices}"
    dump.mkdir()
    args = ["fit", "--preset", "tiny", "--stage", stage, "--data.csv", str(csv), "--out", str(out),
            *COMMON, *STAGES[stage], *extra, "--data.batch_size", str(4 // devices)]
    if devices > 1:
        args += ["--trainer.strategy", "ddp", "--trainer.devices", str(devices)]
    env = dict(os.environ, LDAE_DDP_DUMP=str(dump), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("best checkpoint:") == 1  # printed by the main process only
    return dump, out


# Stage 3 standardises y_sem over the global batch: dividing by the spread of 4 nearly identical initial codes
# amplifies float32 summation-order differences to ~1e-4 (per-process statistics would give ~1e0)
GRAD_RTOL = {"autoencoder": 1e-4, "diffusion": 1e-4, "representation": 1e-3}
# Adam's first step is lr * sign(g): an element whose gradient is within that noise may step the other way
FLIPS_MAX = {"autoencoder": 1e-4, "diffusion": 1e-4, "representation": 1e-3}
# ... and it removes any shift shared by the whole batch: the biases that only shift y_sem get no gradient
ZERO_GRAD = {"representation": ("encoder.norm.bias", "encoder.proj.bias")}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["diffusion", "autoencoder", "representation"])
def test_ddp_step_equals_full_batch_step(stage: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if stage == "representation":
        csv, diffusion = request.getfixturevalue("representation_cohort")
        extra: tuple[str, ...] = ("--diffusion_checkpoint", str(diffusion))
    else:
        csv, extra = request.getfixturevalue("cohorts")[stage], ()
    one_dump, _ = _fit(tmp_path, stage, csv, devices=1, extra=extra)
    two_dump, two_out = _fit(tmp_path, stage, csv, devices=2, extra=extra)

    # one optimiser step per optimiser (the autoencoder steps the generator, then the discriminator)
    steps = sorted(p.name for p in one_dump.glob("grads_rank0_*.pt"))
    assert len(steps) == (2 if stage == "autoencoder" else 1)
    for name in steps:
        full = _load(one_dump / name)
        halves = [_load(two_dump / name.replace("rank0", f"rank{r}")) for r in (0, 1)]
        assert len(full["indices"]) == 4
        assert [len(h["indices"]) for h in halves] == [2, 2]
        assert sorted(halves[0]["indices"] + halves[1]["indices"]) == sorted(full["indices"])
        assert full["grads"].keys() == halves[0]["grads"].keys() == halves[1]["grads"].keys()
        largest = max(float(g.abs().max()) for g in full["grads"].values())
        for key, g in full["grads"].items():
            assert torch.equal(halves[0]["grads"][key], halves[1]["grads"][key]), key  # all-reduced
            scale = float(g.abs().max())
            if key in ZERO_GRAD.get(stage, ()):  # mathematically zero: only rounding noise to compare
                assert scale <= 1e-5 * largest, key
                continue
            assert scale > 0, f"{key}: zero gradient, the comparison would be vacuous"
            assert float((halves[0]["grads"][key] - g).abs().max()) <= GRAD_RTOL[stage] * scale, key

    one = _load(one_dump / "weights_rank0.pt")
    two = [_load(two_dump / f"weights_rank{r}.pt") for r in (0, 1)]
    floats = [k for k, v in one.items() if v.is_floating_point()]
    for key in floats:
        assert torch.equal(two[0][key], two[1][key]), key  # the processes stay in sync
    # parameters with only rounding noise for a gradient take a full Adam step of either sign: not compared
    noise_only = {f"{prefix}{k.removeprefix('encoder.')}" for k in ZERO_GRAD.get(stage, ())
                  for prefix in ("encoder.", "ema_encoder.module.")}
    diff = torch.cat([(one[k] - two[0][k]).abs().flatten() for k in floats if k not in noise_only])
    # Adam's first step is ~lr * sign(g): elements whose gradient is ~eps may differ by float noise
    lr = LR[stage]
    assert float(diff.mean()) < 1e-3 * lr
    assert float((diff > 0.01 * lr).float().mean()) < FLIPS_MAX[stage]

    assert sorted(p.name for p in (two_out / "checkpoints").glob("*.ckpt*")) == ["best.ckpt", "last.ckpt"]
    assert not list(two_out.rglob("*.tmp*"))
    state = _load(two_out / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(state[k], two[0][k]) for k in floats)
    assert {p.name for p in two_out.iterdir()} <= {"checkpoints", "config.yaml", "figures", "logs"}
    assert len(pd.read_csv(two_out / "logs" / "metrics.csv").dropna(subset=[LOSS_KEY[stage]])) == 1


def test_fit_accepts_any_lightning_trainer_argument(capsys: pytest.CaptureFixture) -> None:
    import yaml

    args = ["fit", "--preset", "tiny", "--stage", "diffusion", "--print-config", "--trainer.strategy", "ddp",
            "--trainer.devices", "2", "--trainer.num_nodes", "2", "--trainer.sync_batchnorm", "true"]
    assert main(args) == 0
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert (trainer["strategy"], trainer["devices"], trainer["num_nodes"], trainer["sync_batchnorm"]) == \
        ("ddp", 2, 2, True)
    assert main(["fit", "--preset", "tiny", "--stage", "diffusion", "--trainer.strategyy", "ddp"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'trainer.strategyy'" in err and "or any lightning Trainer argument" in err
    assert main(["fit", "--preset", "tiny", "--stage", "diffusion", "--model.strategy", "ddp"]) == 2
    assert "unknown config key 'model.strategy'" in capsys.readouterr().err


def test_autoencoder_ddp_finds_unused_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of stage 1's two backward passes leaves one network without gradients: plain ``ddp`` would
    fail at the second step, so the stage switches to ``ddp_find_unused_parameters_true``."""
    from ldae.config import load_preset
    from ldae.training import autoencoder, common

    seen = {}

    def fake_make_trainer(cfg, out, monitor, mode="max", callbacks=None, **kw):
        seen.update(cfg["trainer"])
        raise SystemExit(0)

    monkeypatch.setattr(common, "make_trainer", fake_make_trainer)
    csv = write_phantom_cohort(tmp_path / "c", n_subjects=3, sessions=(0, 12), seed=0)
    cfg = load_preset("tiny", "autoencoder")
    cfg["data"]["csv"], cfg["out"] = str(csv), str(tmp_path / "run")
    cfg["trainer"]["strategy"] = "ddp"
    with pytest.raises(SystemExit):
        autoencoder.fit(cfg)
    assert seen["strategy"] == "ddp_find_unused_parameters_true"
