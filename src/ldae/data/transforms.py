"""Volume loading with validation, and the transform chain that makes a scan model-ready.

Chain: load NIfTI (affine kept, file named in every error) -> check its affine and field of view ->
resample onto the model's grid *by the affine* (:mod:`ldae.data.geometry`: MNI space, the model's spacing and
shape) -> robust intensity scaling to [0, 1] (:func:`robust_scale`). A volume that is not 3D, holds NaN/inf,
or is constant (e.g. all zero) is rejected with a CohortError naming the file, as is one whose affine cannot
place it on the grid (none, identity, degenerate) or whose field of view misses part of the brain.
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ldae.data.geometry import existing_file
from ldae.errors import CohortError

if TYPE_CHECKING:
    from ldae.data.geometry import ModelGrid


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI as ``(float32 array XYZ, 4x4 affine)``, validating it (see :func:`validate_volume`)."""
    import nibabel as nib

    from ldae.errors import describe

    path = existing_file(path)
    try:
        img = nib.load(str(path))
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported below, by file
            data = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise CohortError(f"{path}: cannot read NIfTI ({describe(exc)})") from None
    data = validate_volume(data, source=str(path))
    return data, np.asarray(img.affine, dtype=np.float64)


def read_model_ready(path: str | Path, grid: ModelGrid) -> tuple[np.ndarray, np.ndarray]:
    """A scan on the model's ``grid`` with robust [0, 1] intensities, and the grid's affine.

    Header geometry is checked first (no voxel data read for a scan that cannot be used), then the voxels
    (3D, finite, not constant), then the volume is resampled by its affine and scaled."""
    from ldae.data.geometry import check_affine, check_coverage, header_geometry, resample_to_grid

    shape, affine, codes = header_geometry(path)
    affine = check_affine(affine, str(path), codes)
    check_coverage(affine, shape, grid, str(path))
    data, _ = read_volume(path)
    peak = float(np.abs(data).max())  # bring huge finite values (e.g. ±3e38) into range before interpolating
    data = (data.astype(np.float64) / peak).astype(np.float32)
    volume = resample_to_grid(data, affine, grid)
    return robust_scale(volume, source=str(path)), grid.affine


def validate_volume(data: np.ndarray, source: str = "volume") -> np.ndarray:
    """Return ``data`` as 3D (a trailing singleton 4th axis is dropped) or raise CohortError."""
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CohortError(f"{source}: expected a 3D volume, got {data.ndim}D with shape {tuple(data.shape)}")
    if min(data.shape) < 2:
        raise CohortError(f"{source}: volume has a degenerate shape {tuple(data.shape)}")
    finite = np.isfinite(data)
    if not finite.all():
        n_bad = int((~finite).sum())
        raise CohortError(f"{source}: volume holds {n_bad} NaN/inf voxel(s)")
    if float(data.max()) == float(data.min()):
        raise CohortError(f"{source}: volume is constant (value {float(data.min()):g}), e.g. all zero")
    return data


#: intensity rule: clip to [min(0, P_0.5), P_99.5] of the nonzero voxels, then map that range to [0, 1]
INTENSITY_PERCENTILES = (0.5, 99.5)


def robust_scale(volume: np.ndarray, source: str = "volume",
                 percentiles: tuple[float, float] = INTENSITY_PERCENTILES) -> np.ndarray:
    """Intensities to [0, 1] by a rule that a few extreme voxels cannot hijack.

    With ``P_q`` the q-th percentile of the volume's *nonzero* voxels (so the zero background of a
    skull-stripped scan and the zero padding of the resampling do not count),
    ``lo = min(0, P_0.5)`` and ``hi = P_99.5``: ``x -> clip((x - lo) / (hi - lo), 0, 1)``. For a non-negative
    scan this is ``x / P_99.5``: zero stays zero, tissue contrast is kept, only the brightest 0.5 % of the
    nonzero voxels saturate at 1. Plain min-max instead lets one voxel at 1e6 squash the brain to ~0.
    Computed in float64; CohortError naming ``source`` when the volume is constant.
    """
    x = np.asarray(volume, dtype=np.float64)
    nonzero = x[x != 0]
    if nonzero.size == 0:
        raise CohortError(f"{source}: volume is constant (value 0), e.g. all zero")
    p_lo, p_hi = np.percentile(nonzero, percentiles)
    lo, hi = min(0.0, float(p_lo)), float(p_hi)
    if not hi > lo:  # e.g. a handful of nonzero voxels: fall back to their full range
        lo, hi = min(0.0, float(nonzero.min())), float(nonzero.max())
    if not hi > lo:
        raise CohortError(f"{source}: volume is constant after resampling onto the model's grid")
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


class LoadVolumed:
    """Dictionary transform: replace ``d[key]`` (a path) by a channel-first model-ready MetaTensor on the
    model's grid (``grid``), with the grid's affine; without a grid, the scan as stored (validated)."""

    def __init__(self, keys: Sequence[Hashable] = ("image",), grid: ModelGrid | None = None) -> None:
        self.keys = tuple(keys)
        self.grid = grid

    def __call__(self, d: Mapping[Hashable, Any]) -> dict:
        from monai.data import MetaTensor

        out = dict(d)
        for key in self.keys:
            if self.grid is None:
                data, affine = read_volume(out[key])
            else:
                data, affine = read_model_ready(out[key], self.grid)
            out[key] = MetaTensor(
                torch.from_numpy(np.ascontiguousarray(data[None])),
                affine=torch.as_tensor(affine),
                meta={"filename_or_obj": str(out[key])},
            )
        return out


def volume_transforms(
    spacing: float | Sequence[float] = 1.5,
    shape: Sequence[int] = (128, 160, 128),
    keys: Sequence[str] = ("image",),
):
    """The model-ready chain: load, check and resample by the affine onto the model's grid (``spacing`` mm,
    ``shape`` voxels, MNI-centred; :mod:`ldae.data.geometry`), robust scaling to [0, 1]."""
    from monai.transforms import Compose, EnsureTyped

    from ldae.data.geometry import ModelGrid

    grid = ModelGrid.of(spacing, shape)
    return Compose([LoadVolumed(keys, grid=grid), EnsureTyped(keys=list(keys), dtype=torch.float32)])


def load_model_ready(
    path: str | Path, spacing: float | Sequence[float] = 1.5, shape: Sequence[int] = (128, 160, 128)
) -> torch.Tensor:
    """One scan through :func:`volume_transforms`: a ``(1, D, H, W)`` MetaTensor in [0, 1]."""
    return volume_transforms(spacing, shape)({"image": str(path)})["image"]


def check_model_ready(paths: Sequence[str | Path], spacing: float | Sequence[float], shape: Sequence[int],
                      names: Sequence[str] | None = None) -> None:
    """Header-only check of many scans before any computation (geometry as :func:`read_model_ready`);
    the error names the scan (``names[i]``, e.g. "cohort.csv: row 7", prefixed when given)."""
    from ldae.data.geometry import ModelGrid, check_geometry

    grid = ModelGrid.of(spacing, shape)
    for i, path in enumerate(paths):
        try:
            check_geometry(path, grid)
        except CohortError as exc:
            if names is None:
                raise
            raise CohortError(f"{names[i]}: {exc}") from None


class ModelReadyInput:
    """Mixin of the inference models (attributes ``spacing``, ``shape``, property ``device``): read a scan
    model-ready and check a batch of volumes against the model's grid."""

    spacing: Any
    shape: tuple[int, ...]
    device: torch.device

    def load_volume(self, path: str | Path) -> tuple[torch.Tensor, np.ndarray]:
        """A model-ready scan ``(1, 1, D, H, W)`` on the model's device and its (output) affine."""
        vol = load_model_ready(path, self.spacing, self.shape)
        return vol.as_tensor()[None].to(self.device), np.asarray(vol.affine, dtype=np.float64)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as float32 on the model's device; LDAEError unless it is ``(B, 1, *shape)``."""
        from ldae.errors import LDAEError

        if x.ndim != 5 or x.shape[1] != 1 or tuple(x.shape[2:]) != tuple(self.shape):
            raise LDAEError(f"expected volumes of shape (B, 1, {', '.join(map(str, self.shape))}), "
                            f"got {tuple(x.shape)}")
        return x.to(self.device, torch.float32)
