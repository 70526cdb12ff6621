"""Volume loading with validation, and the MONAI transform chain that makes a scan model-ready.

Chain: load NIfTI (affine kept, file named in every error) -> channel-first -> RAS -> spacing ->
crop/pad to the preset shape -> min-max to [0, 1]. A volume that is not 3D, holds NaN/inf, or is
constant (e.g. all zero) is rejected with a CohortError naming the file.
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldae.errors import CohortError


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI as ``(float32 array XYZ, 4x4 affine)``, validating it (see :func:`validate_volume`)."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise CohortError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CohortError(f"{path}: cannot read NIfTI ({reason})") from None
    data = validate_volume(data, source=str(path))
    return data, np.asarray(img.affine, dtype=np.float64)


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


class LoadVolumed:
    """Dictionary transform: replace ``d[key]`` (a path) by a channel-first MetaTensor with its affine."""

    def __init__(self, keys: Sequence[Hashable] = ("image",)) -> None:
        self.keys = tuple(keys)

    def __call__(self, d: Mapping[Hashable, Any]) -> dict:
        from monai.data import MetaTensor

        out = dict(d)
        for key in self.keys:
            data, affine = read_volume(out[key])
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
    """The model-ready chain: load, RAS, resample to ``spacing`` mm, crop/pad to ``shape``, scale to [0,1]."""
    from monai.transforms import (
        Compose,
        EnsureTyped,
        Orientationd,
        ResizeWithPadOrCropd,
        ScaleIntensityd,
        Spacingd,
    )

    pixdim = (float(spacing),) * 3 if np.isscalar(spacing) else tuple(float(s) for s in spacing)
    return Compose(
        [
            LoadVolumed(keys),
            Orientationd(keys=list(keys), axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys=list(keys), pixdim=pixdim, mode="bilinear"),
            ResizeWithPadOrCropd(keys=list(keys), spatial_size=tuple(int(s) for s in shape)),
            ScaleIntensityd(keys=list(keys), minv=0.0, maxv=1.0),
            EnsureTyped(keys=list(keys), dtype=torch.float32),
        ]
    )


def load_model_ready(
    path: str | Path, spacing: float | Sequence[float] = 1.5, shape: Sequence[int] = (128, 160, 128)
) -> torch.Tensor:
    """One scan through :func:`volume_transforms`: a ``(1, D, H, W)`` MetaTensor in [0, 1]."""
    return volume_transforms(spacing, shape)({"image": str(path)})["image"]


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
