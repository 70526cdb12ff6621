"""Figures shared by all stages: orthogonal-slice mosaics of 3D volumes, saved atomically as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ldae.io import atomic_path


def _save_figure(fig: Any, path: str | Path, title: str | None) -> Path:
    """Title, tighten, write ``fig`` as a PNG under a temporary name renamed to ``path``, close it."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(plain_text(title), fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return Path(path)


def plain_text(text: object) -> str:
    """``text`` for a matplotlib title or label, shown literally: ``$`` escaped so that a file name such as
    ``scan_$1.nii.gz`` (or two ``$`` in a name) is not parsed as mathtext, which fails or garbles the PNG."""
    return str(text).replace("$", r"\$")


def _as_numpy(volume) -> np.ndarray:
    """A (D, H, W) float array from a numpy array or tensor with optional leading singleton axes."""
    if hasattr(volume, "detach"):
        volume = volume.detach().float().cpu().numpy()
    vol = np.asarray(volume, dtype=np.float32)
    while vol.ndim > 3 and vol.shape[0] == 1:
        vol = vol[0]
    if vol.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {vol.shape}")
    return vol


def orthogonal_slices(volume, index: Sequence[int] | None = None) -> list[np.ndarray]:
    """Sagittal, coronal and axial mid slices (RAS volume), rotated for display."""
    vol = _as_numpy(volume)
    i, j, k = index if index is not None else [s // 2 for s in vol.shape]
    return [np.rot90(vol[i, :, :]), np.rot90(vol[:, j, :]), np.rot90(vol[:, :, k])]


def save_mosaic(
    path: str | Path,
    rows: Sequence[tuple[str, object]],
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
    cmap: str = "gray",
    title: str | None = None,
) -> Path:
    """Save a grid: one row per ``(label, volume)``, three orthogonal slices per row.

    A row whose label starts with ``|`` (e.g. ``"|error|"``) or ``diff`` is drawn with its own colour
    scale (hot colour map for magnitudes, a diverging map for signed differences).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n), squeeze=False)
    for r, (label, volume) in enumerate(rows):
        slices = orthogonal_slices(volume)
        if label.startswith("|"):
            kw = {"cmap": "hot", "vmin": 0.0, "vmax": max(float(max(s.max() for s in slices)), 1e-6)}
        elif label.startswith("diff"):
            lim = max(float(max(np.abs(s).max() for s in slices)), 1e-6)
            kw = {"cmap": "coolwarm", "vmin": -lim, "vmax": lim}
        else:
            kw = {"cmap": cmap, "vmin": vmin, "vmax": vmax}
        for c, sl in enumerate(slices):
            ax = axes[r, c]
            ax.imshow(sl, interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(plain_text(label), fontsize=9)
    return _save_figure(fig, path, title)


def save_strip(
    path: str | Path,
    volumes: Sequence[object],
    labels: Sequence[str],
    axis_view: int = 2,
    title: str | None = None,
    diff_to: int | None = None,
) -> Path:
    """One slice view (0 sagittal, 1 coronal, 2 axial) of several volumes side by side, e.g. over α or t;
    with ``diff_to`` a second row shows each volume minus ``volumes[diff_to]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vols = [_as_numpy(v) for v in volumes]
    n_rows = 1 if diff_to is None else 2
    fig, axes = plt.subplots(n_rows, len(vols), figsize=(2.2 * len(vols), 2.4 * n_rows), squeeze=False)
    ref = orthogonal_slices(vols[diff_to])[axis_view] if diff_to is not None else None
    lim = 1e-6
    if ref is not None:
        lim = max(lim, max(float(np.abs(orthogonal_slices(v)[axis_view] - ref).max()) for v in vols))
    for c, (vol, label) in enumerate(zip(vols, labels)):
        sl = orthogonal_slices(vol)[axis_view]
        axes[0, c].imshow(sl, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[0, c].set_title(plain_text(label), fontsize=9)
        if ref is not None:
            axes[1, c].imshow(sl - ref, cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest")
        for r in range(n_rows):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
    if ref is not None:
        axes[1, 0].set_ylabel("difference", fontsize=9)
    return _save_figure(fig, path, title)
