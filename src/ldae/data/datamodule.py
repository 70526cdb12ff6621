"""Lightning data modules for volumes (stage 1) and latents (stages 2-3).

Both read a validated cohort CSV, keep its subject-level ``split`` column (assigning one, seeded, when
absent) and serve dict batches: ``image`` or ``latent`` plus ``subject``, ``session``, ``diagnosis``,
``age`` and ``index`` (row in the cohort).
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from ldae.data.cohort import DEFAULT_LABELS, ensure_split, read_cohort
from ldae.data.transforms import check_model_ready, volume_transforms
from ldae.errors import CohortError


def _meta(row: pd.Series, index: int) -> dict[str, Any]:
    return {
        "subject": str(row["subject"]),
        "session": int(row["session"]),
        "diagnosis": str(row["diagnosis"]),
        "age": float(row["age"]),
        "index": int(index),
    }


class VolumeDataset(Dataset):
    """Model-ready volumes of some cohort rows, optionally cached in memory after the first load."""

    def __init__(
        self,
        df: pd.DataFrame,
        spacing: float | Sequence[float],
        shape: Sequence[int],
        cache: bool = False,
    ) -> None:
        self.df = df
        self.transform = volume_transforms(spacing, shape)
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.df.iloc[i]
        if self.cache is not None and i in self.cache:
            image = self.cache[i]
        else:
            image = self.transform({"image": row["path"]})["image"].as_tensor()
            if self.cache is not None:
                self.cache[i] = image
        return {"image": image, **_meta(row, int(row.name))}


def read_latent(path: str | Path, expected_shape: Sequence[int] | None = None) -> np.ndarray:
    """Load the ``latent`` array of a ``*_latent.npz``; CohortError on a bad file or wrong shape."""
    try:
        with np.load(path) as npz:
            latent = np.asarray(npz["latent"], dtype=np.float32)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CohortError(f"{path}: cannot read latent NPZ ({str(exc).splitlines()[0] or type(exc).__name__})") from None
    if expected_shape is not None and tuple(latent.shape) != tuple(expected_shape):
        raise CohortError(
            f"{path}: latent has shape {tuple(latent.shape)}, expected {tuple(expected_shape)}"
        )
    if not np.isfinite(latent).all():
        raise CohortError(f"{path}: latent holds NaN/inf values")
    return latent


class LatentDataset(Dataset):
    """Latents (``latent_path`` column), loaded once into memory (they are small)."""

    def __init__(self, df: pd.DataFrame, expected_shape: Sequence[int] | None = None) -> None:
        if "latent_path" not in df.columns:
            raise CohortError("cohort has no 'latent_path' column: run `ldae compress` first")
        missing = df["latent_path"].isna()
        if missing.any():
            i = int(np.flatnonzero(missing.to_numpy())[0])
            raise CohortError(f"cohort row {i + 2}: column 'latent_path' is empty: run `ldae compress`")
        self.df = df
        self.latents = [torch.from_numpy(read_latent(p, expected_shape)) for p in df["latent_path"]]

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.df.iloc[i]
        return {"latent": self.latents[i], **_meta(row, int(row.name))}


class _CohortDataModule(pl.LightningDataModule):
    """Shared split handling and loaders."""

    def __init__(
        self,
        csv: str | Path,
        batch_size: int = 1,
        num_workers: int = 0,
        labels: Sequence[str] = DEFAULT_LABELS,
        seed: int = 0,
        test_fraction: float = 0.1,
        val_fraction: float = 0.01,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.csv = Path(csv)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.labels = tuple(labels)
        self.seed = int(seed)
        self.split_kwargs = {"test_fraction": test_fraction, "val_fraction": val_fraction}
        self.cohort: pd.DataFrame | None = None
        self.datasets: dict[str, Dataset] = {}

    def load_cohort(self) -> pd.DataFrame:
        if self.cohort is None:
            df = read_cohort(self.csv, labels=self.labels)
            self.cohort = ensure_split(df, seed=self.seed, **self.split_kwargs)
        return self.cohort

    def rows(self, split: str) -> pd.DataFrame:
        df = self.load_cohort()
        return df[df["split"] == split]

    def make_dataset(self, df: pd.DataFrame) -> Dataset:  # pragma: no cover - abstract
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val", "test"):
            if split not in self.datasets:
                self.datasets[split] = self.make_dataset(self.rows(split))

    def loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        """A DataLoader over one split."""
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", False, self.eval_batch_size)


def _checked_cohort(dm: Any) -> pd.DataFrame:
    """``dm``'s cohort, with every scan's header checked against the model's grid (affine, field of view)
    once, before any training: the error names the CSV row."""
    if dm.cohort is None:
        df = _CohortDataModule.load_cohort(dm)
        try:
            check_model_ready(list(df["path"]), dm.spacing, dm.shape,
                              names=[f"{dm.csv}: row {i + 2}" for i in range(len(df))])
        except CohortError:
            dm.cohort = None
            raise
    return dm.cohort


class VolumeDataModule(_CohortDataModule):
    """Model-ready volumes (stage 1 training, latent export)."""

    def __init__(
        self,
        csv: str | Path,
        spacing: float | Sequence[float] = 1.5,
        shape: Sequence[int] = (128, 160, 128),
        cache: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(csv, **kwargs)
        self.spacing = spacing
        self.shape = tuple(int(s) for s in shape)
        self.cache = bool(cache)

    def load_cohort(self) -> pd.DataFrame:
        return _checked_cohort(self)

    def make_dataset(self, df: pd.DataFrame) -> Dataset:
        return VolumeDataset(df, self.spacing, self.shape, cache=self.cache and self.num_workers == 0)


class LatentDataModule(_CohortDataModule):
    """Latent NPZs from ``ldae compress`` (stages 2 and 3)."""

    def __init__(self, csv: str | Path, latent_shape: Sequence[int] | None = None, **kwargs: Any) -> None:
        super().__init__(csv, **kwargs)
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None

    def make_dataset(self, df: pd.DataFrame) -> Dataset:
        return LatentDataset(df, self.latent_shape)


class ImageLatentDataset(Dataset):
    """Model-ready volume and its latent, per cohort row (stage 3: the encoder sees the image, the
    diffusion model the latent)."""

    def __init__(
        self,
        df: pd.DataFrame,
        spacing: float | Sequence[float],
        shape: Sequence[int],
        latent_shape: Sequence[int] | None = None,
        cache: bool = True,
    ) -> None:
        self.volumes = VolumeDataset(df, spacing, shape, cache=cache)
        self.latents = LatentDataset(df, latent_shape)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.volumes[i]
        item["latent"] = self.latents.latents[i]
        return item


class ImageLatentDataModule(_CohortDataModule):
    """Volumes + latents from a compressed cohort CSV (``path`` and ``latent_path`` columns)."""

    def __init__(
        self,
        csv: str | Path,
        spacing: float | Sequence[float] = 1.5,
        shape: Sequence[int] = (128, 160, 128),
        latent_shape: Sequence[int] | None = None,
        cache: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(csv, **kwargs)
        self.spacing = spacing
        self.shape = tuple(int(s) for s in shape)
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
        self.cache = bool(cache)

    def load_cohort(self) -> pd.DataFrame:
        return _checked_cohort(self)

    def make_dataset(self, df: pd.DataFrame) -> Dataset:
        return ImageLatentDataset(
            df, self.spacing, self.shape, self.latent_shape, cache=self.cache and self.num_workers == 0
        )
