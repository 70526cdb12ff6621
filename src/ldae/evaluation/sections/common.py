"""What the evaluation sections share: model-ready scans loaded once, batched embedding, per-scan scores."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch

#: ground-truth volume columns of the bundled (synthetic) cohort
GT_VOLUMES = ("ventricle_volume_ml", "hippocampus_volume_ml", "brain_volume_ml")


def progress(items: list, description: str) -> Any:
    """``items`` with a transient progress bar."""
    from rich.progress import track

    return track(items, description=description, transient=True)


class ScanCache:
    """Model-ready volumes of cohort rows, loaded once."""

    def __init__(self, df: pd.DataFrame, spacing: Any, shape: tuple[int, ...], device: str) -> None:
        from ldae.data.transforms import volume_transforms

        self.df = df
        self.transform = volume_transforms(spacing, shape)
        self.device = device
        self._cache: dict[int, tuple[torch.Tensor, np.ndarray]] = {}

    def get(self, i: int) -> torch.Tensor:
        """``(1, 1, D, H, W)`` volume of row label ``i``."""
        if i not in self._cache:
            vol = self.transform({"image": self.df.loc[i, "path"]})["image"]
            self._cache[i] = (vol.as_tensor()[None].to(self.device), np.asarray(vol.affine, dtype=np.float64))
        return self._cache[i][0]

    def affine(self, i: int) -> np.ndarray:
        self.get(i)
        return self._cache[i][1]

    def batch(self, rows: list[int]) -> torch.Tensor:
        return torch.cat([self.get(i) for i in rows])


def embed(fn: Callable[[torch.Tensor], torch.Tensor], scans: ScanCache, rows: list[int], batch_size: int,
          description: str) -> np.ndarray:
    """``fn`` (volumes -> vectors) over cohort rows, batched; ``(n, d)`` float64."""
    out = []
    chunks = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    for chunk in progress(chunks, description):
        with torch.no_grad():
            out.append(fn(scans.batch(chunk)).double().cpu().numpy())
    return np.concatenate(out)


def scores(pred: torch.Tensor, ref: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-sample SSIM/MSE/PSNR (:func:`ldae.metrics.reconstruction_metrics`) as numpy arrays."""
    from ldae.metrics import reconstruction_metrics

    return {k: v.detach().cpu().numpy() for k, v in reconstruction_metrics(pred.float(), ref.float()).items()}
