"""Latent export: NPZ contents against a direct encode, CSV/split bookkeeping, the scale factor recomputed
independently, skipping of up-to-date latents, metadata errors, and the `ldae compress` command."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ldae.cli import main
from ldae.config import load_preset
from ldae.data.cohort import ensure_split, read_cohort
from ldae.data.latents import read_latent_meta
from ldae.data.transforms import load_model_ready
from ldae.errors import CohortError
from ldae.jobs.compress import compress, default_out_dir, latent_names
from ldae.runs import COMPRESSED_CSV, LATENT_META
from ldae.training.autoencoder import AutoencoderModule


def _checkpoint(path: Path, seed: int = 0) -> Path:
    """A stage-1 checkpoint (random weights) for the tiny preset grid 32x40x32 -> 3x8x10x8."""
    torch.manual_seed(seed)
    cfg = load_preset("tiny", "autoencoder")
    cfg["out"] = str(path.parent.parent)
    module = AutoencoderModule(cfg)
    ckpt: dict = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return _checkpoint(tmp_path / "run" / "autoencoder" / "checkpoints" / "best.ckpt")


def _mtimes(df: pd.DataFrame) -> list[int]:
    return [os.stat(p).st_mtime_ns for p in df["latent_path"]]


def test_compress_round_trip(tmp_path: Path, ckpt: Path, phantom_cohort: Path) -> None:
    out = tmp_path / "latents_out"
    csv = compress(ckpt, phantom_cohort, out, batch_size=5)
    assert csv == out / COMPRESSED_CSV
    df = read_cohort(csv)
    assert "latent_path" in df.columns and len(df) == 12
    assert all(Path(p).parent == (out / "latents").resolve() for p in df["latent_path"])
    assert Path(df["latent_path"][0]).name == "sub-0000_ses-M00_T1w_latent.npz"
    # split: the same subject-level assignment the autoencoder's training used (seed/fractions of its config)
    expected = ensure_split(read_cohort(phantom_cohort), seed=0, test_fraction=0.1, val_fraction=0.01)
    assert list(df["split"]) == list(expected["split"])

    from ldae.checkpoints import load_autoencoder
    from ldae.nets.weights import weights_fingerprint

    net, _ = load_autoencoder(ckpt)
    for i in (0, 7):
        with np.load(df["latent_path"][i]) as npz:
            z = npz["latent"]
        assert z.shape == (3, 8, 10, 8) and z.dtype == np.float32
        x = load_model_ready(df["path"][i], 6.0, (32, 40, 32)).as_tensor()[None]
        with torch.no_grad():
            mu, _ = net.encode(x)  # posterior mean, not a sample
        np.testing.assert_allclose(z, mu[0].numpy(), atol=1e-5)

    # scale factor = 1 / std over the train split's latents, recomputed here with numpy
    train = np.stack([np.load(p)["latent"] for p in df.loc[df["split"] == "train", "latent_path"]])
    meta = json.loads((out / LATENT_META).read_text())
    assert meta["scale_factor"] == pytest.approx(1.0 / train.astype(np.float64).std(), rel=1e-6)
    assert meta["latent_mean"] == pytest.approx(train.astype(np.float64).mean(), abs=1e-6)
    assert meta["latent_shape"] == [3, 8, 10, 8] and meta["shape"] == [32, 40, 32] and meta["spacing"] == 6.0
    assert meta["autoencoder_checkpoint"] == str(ckpt.resolve()) and meta["encoded_last_run"] == 12
    assert meta["autoencoder_fingerprint"] == weights_fingerprint(net)  # what the next stages record
    assert read_latent_meta(csv) == meta and read_latent_meta(out) == meta

    from ldae.data.datamodule import LatentDataModule

    dm = LatentDataModule(csv, latent_shape=meta["latent_shape"])
    dm.setup()
    assert len(dm.datasets["train"]) == int((df["split"] == "train").sum())


def test_rerun_skips_up_to_date_latents(tmp_path: Path, ckpt: Path, phantom_cohort: Path) -> None:
    out = tmp_path / "out"
    df = read_cohort(compress(ckpt, phantom_cohort, out))
    before = _mtimes(df)
    compress(ckpt, phantom_cohort, out)
    assert _mtimes(df) == before and read_latent_meta(out)["encoded_last_run"] == 0

    future = df["latent_path"].map(lambda p: os.stat(p).st_mtime).max() + 10
    os.utime(df["path"][3], (future, future))  # one image changed after its latent
    compress(ckpt, phantom_cohort, out)
    after = _mtimes(df)
    assert [a != b for a, b in zip(after, before)] == [i == 3 for i in range(12)]
    assert read_latent_meta(out)["encoded_last_run"] == 1

    # another checkpoint (different hash): everything is re-encoded and the latents change
    z_old = np.load(df["latent_path"][0])["latent"]
    _checkpoint(ckpt, seed=1)
    compress(ckpt, phantom_cohort, out)
    assert read_latent_meta(out)["encoded_last_run"] == 12
    assert not np.allclose(np.load(df["latent_path"][0])["latent"], z_old)
    compress(ckpt, phantom_cohort, out, force=True)
    assert read_latent_meta(out)["encoded_last_run"] == 12


def test_existing_split_is_kept_and_train_split_required(tmp_path: Path, ckpt: Path, phantom_cohort: Path) -> None:
    df = pd.read_csv(phantom_cohort)
    subjects = sorted(df["subject"].unique())
    df["split"] = ["val" if s == subjects[0] else "test" if s == subjects[1] else "train" for s in df["subject"]]
    custom = phantom_cohort.parent / "custom.csv"
    df.to_csv(custom, index=False)
    out_df = read_cohort(compress(ckpt, custom, tmp_path / "a"))
    assert list(out_df["split"]) == list(df["split"])

    df["split"] = "test"
    df.to_csv(custom, index=False)
    with pytest.raises(CohortError, match="train split is empty"):
        compress(ckpt, custom, tmp_path / "b")


def test_duplicate_file_names_get_subject_prefix(tmp_path: Path) -> None:
    df = pd.DataFrame({"subject": ["a", "b"], "session": [0, 6], "path": ["/x/a/T1.nii.gz", "/x/b/T1.nii.gz"]})
    assert latent_names(df) == ["a_M000_T1_latent.npz", "b_M006_T1_latent.npz"]
    df["subject"] = "a"
    df["session"] = 0
    with pytest.raises(CohortError, match="same latent name"):
        latent_names(df)


def test_read_latent_meta_errors(tmp_path: Path) -> None:
    with pytest.raises(CohortError, match="run `ldae compress` first"):
        read_latent_meta(tmp_path / "cohort.csv")
    (tmp_path / LATENT_META).write_text('{"scale_factor": 1.0}')
    with pytest.raises(CohortError, match="missing key.*latent_shape"):
        read_latent_meta(tmp_path)


def test_default_out_dir_is_run_latents(tmp_path: Path) -> None:
    ckpt = tmp_path / "RUN" / "autoencoder" / "checkpoints" / "best.ckpt"
    assert default_out_dir(ckpt) == (tmp_path / "RUN" / "latents").resolve()


def test_cli_compress(tmp_path: Path, ckpt: Path, phantom_cohort: Path, capsys: pytest.CaptureFixture) -> None:
    run = ckpt.parent.parent.parent  # full run folder: RUN/autoencoder/checkpoints/best.ckpt
    assert main(["compress", "--autoencoder", str(run), "--csv", str(phantom_cohort), "--batch-size", "6"]) == 0
    assert "12 scans, 12 encoded now" in capsys.readouterr().out
    assert (run / "latents" / COMPRESSED_CSV).is_file()

    other = tmp_path / "diffusion.ckpt"
    shutil.copy(ckpt, other)
    blob = torch.load(other, weights_only=True)
    blob["ldae"]["stage"] = "diffusion"
    torch.save(blob, other)
    assert main(["compress", "--autoencoder", str(other), "--csv", str(phantom_cohort)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected stage 'autoencoder'" in err[0]
