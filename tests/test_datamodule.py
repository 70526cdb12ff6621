from pathlib import Path

import numpy as np
import pytest
import torch

from ldae.data.cohort import read_cohort, write_cohort
from ldae.data.datamodule import LatentDataModule, VolumeDataModule, read_latent
from ldae.errors import CohortError
from ldae.io import write_npz


def test_volume_datamodule_batches(phantom_cohort: Path):
    dm = VolumeDataModule(phantom_cohort, spacing=6.0, shape=(32, 40, 32), batch_size=2, seed=0,
                          test_fraction=0.34, val_fraction=0.25)
    dm.setup()
    splits = dm.load_cohort().groupby("subject")["split"].first().value_counts()
    assert splits["test"] == 2 and splits["val"] == 1 and splits["train"] == 3
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 32, 40, 32)
    assert batch["image"].dtype == torch.float32
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    assert set(batch) >= {"subject", "session", "diagnosis", "age", "index"}
    # the cached second epoch returns identical tensors
    ds = dm.datasets["val"]
    assert torch.equal(ds[0]["image"], ds[0]["image"])
    # every scan appears in exactly one split
    n = sum(len(dm.datasets[s]) for s in ("train", "val", "test"))
    assert n == 12


def _with_row_latents(cohort: Path, tmp_path: Path) -> Path:
    """The cohort + a ``latent_path`` column whose latent (3, 2, 3, 2) is filled with the row number."""
    df = read_cohort(cohort)
    paths = []
    for i in range(len(df)):
        p = tmp_path / "lat" / f"{i}_latent.npz"
        write_npz(p, latent=np.full((3, 2, 3, 2), i, np.float32))
        paths.append(str(p))
    df["latent_path"] = paths
    return write_cohort(df, tmp_path / "with_latent.csv")


def test_latent_datamodule(phantom_cohort: Path, tmp_path: Path):
    csv = _with_row_latents(phantom_cohort, tmp_path)
    dm = LatentDataModule(csv, latent_shape=(3, 2, 3, 2), batch_size=4, test_fraction=0.34)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    assert batch["latent"].shape[1:] == (3, 2, 3, 2)
    # the latent matches its row
    for lat, idx in zip(batch["latent"], batch["index"]):
        assert float(lat.mean()) == pytest.approx(float(idx))
    bad = LatentDataModule(csv, latent_shape=(4, 2, 3, 2))
    with pytest.raises(CohortError, match=r"latent has shape \(3, 2, 3, 2\), expected \(4, 2, 3, 2\)"):
        bad.setup()


def test_read_latent_errors(tmp_path: Path):
    p = tmp_path / "x_latent.npz"
    p.write_bytes(b"garbage")
    with pytest.raises(CohortError, match="cannot read latent NPZ"):
        read_latent(p)
    write_npz(p, other=np.zeros(3))
    with pytest.raises(CohortError, match="cannot read latent NPZ"):
        read_latent(p)
    write_npz(p, latent=np.array([np.nan], np.float32))
    with pytest.raises(CohortError, match="NaN"):
        read_latent(p)


def test_missing_latent_path_column(phantom_cohort: Path):
    dm = LatentDataModule(phantom_cohort)
    with pytest.raises(CohortError, match="run `ldae compress` first"):
        dm.setup()


def test_image_latent_datamodule_pairs_rows(phantom_cohort: Path, tmp_path: Path):
    from ldae.data.datamodule import ImageLatentDataModule

    csv = _with_row_latents(phantom_cohort, tmp_path)
    dm = ImageLatentDataModule(csv, spacing=6.0, shape=(32, 40, 32), latent_shape=(3, 2, 3, 2), batch_size=2)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape[1:] == (1, 32, 40, 32) and batch["latent"].shape[1:] == (3, 2, 3, 2)
    for lat, idx in zip(batch["latent"], batch["index"]):
        assert float(lat.mean()) == pytest.approx(float(idx))
