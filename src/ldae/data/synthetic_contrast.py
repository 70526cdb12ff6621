"""Grey/white contrast of a T1 scan: tissue intensity levels from a 3-class Gaussian mixture.

Used to set and to check the synthetic cohort's contrast against real scans available offline (the
bundled ICBM 2009c template, Colin27 from Debian's ``mricron-data``, any scan a user has). Brain voxels
(non-zero, one voxel eroded off the mask edge) get a 1D Gaussian mixture with three components
(CSF, grey matter, white matter, initialised at the 10th/50th/90th percentiles); the component means,
divided by the white-matter mean, are the tissue levels. Partial-volume voxels fall between classes and
widen the components, so levels depend on the voxel size: compare scans on the same grid.

Reported numbers: ``gm`` and ``csf`` (levels relative to WM), the Michelson grey/white contrast
``(WM - GM) / (WM + GM)`` and the separation ``(WM - GM) / sqrt((sd_GM^2 + sd_WM^2) / 2)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ldae.errors import LDAEError

MAX_SAMPLES = 200_000  # voxels the mixture is fitted on (a seeded subsample; the levels move < 0.1 %)


@dataclass(frozen=True)
class TissueContrast:
    """Tissue levels of one scan (``gm``, ``csf`` relative to white matter, ``wm`` in the scan's units)."""

    wm: float
    gm: float
    csf: float
    michelson: float
    separation: float

    def as_dict(self, digits: int = 4) -> dict[str, float]:
        return {k: round(float(v), digits) for k, v in asdict(self).items()}


def tissue_contrast(volume: np.ndarray, mask: np.ndarray | None = None, seed: int = 0) -> TissueContrast:
    """Tissue levels of ``volume`` inside ``mask`` (default: non-zero voxels, eroded by one voxel)."""
    from sklearn.mixture import GaussianMixture

    volume = np.asarray(volume, np.float32)
    brain = volume > 0 if mask is None else np.asarray(mask, bool)
    brain = ndimage.binary_erosion(brain, iterations=1) if mask is None else brain
    values = volume[brain]
    if values.size < 1000:
        raise LDAEError(f"tissue contrast: only {values.size} brain voxels (need >= 1000)")
    rng = np.random.default_rng(seed)
    if values.size > MAX_SAMPLES:
        values = rng.choice(values, MAX_SAMPLES, replace=False)
    init = np.percentile(values, [10, 50, 90]).reshape(3, 1)
    gmm = GaussianMixture(3, means_init=init, random_state=seed).fit(values.reshape(-1, 1).astype(np.float64))
    order = np.argsort(gmm.means_[:, 0])
    mean = gmm.means_[order, 0]
    sd = np.sqrt(gmm.covariances_.reshape(-1)[order])
    csf, gm, wm = mean
    return TissueContrast(
        wm=float(wm), gm=float(gm / wm), csf=float(csf / wm), michelson=float((wm - gm) / (wm + gm)),
        separation=float((wm - gm) / np.sqrt((sd[1] ** 2 + sd[2] ** 2) / 2)),
    )


def resample_to(volume: np.ndarray, spacing: float, target: float) -> np.ndarray:
    """``volume`` (isotropic ``spacing`` mm, zero outside the brain) on a ``target`` mm grid: Gaussian
    anti-aliasing (the generator's rule), trilinear resampling, the brain edge renormalised by the
    smoothed mask so that the background does not darken edge voxels; zero where the mask is < 1/2."""
    volume = np.asarray(volume, np.float32)
    if np.isclose(spacing, target):
        return volume
    mask = (volume > 0).astype(np.float32)
    sigma = 0.5 * np.sqrt(max(target**2 - spacing**2, 0.0)) / spacing
    if sigma > 0:
        volume, mask = ndimage.gaussian_filter(volume, sigma), ndimage.gaussian_filter(mask, sigma)
    zoom = spacing / target
    volume, mask = ndimage.zoom(volume, zoom, order=1), ndimage.zoom(mask, zoom, order=1)
    return np.where(mask >= 0.5, volume / np.maximum(mask, 1e-3), 0.0).astype(np.float32)


def file_contrast(path: str | Path, spacing: float | None = None, seed: int = 0) -> TissueContrast:
    """Tissue levels of a skull-stripped NIfTI (zero outside the brain), optionally resampled to
    ``spacing`` mm first (isotropic inputs only)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, np.float32)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's
        raise LDAEError(f"{path}: cannot read the scan ({exc})") from None
    zooms = np.asarray(img.header.get_zooms()[:3], float)
    if spacing is not None:
        if not np.allclose(zooms, zooms[0], rtol=1e-3):
            raise LDAEError(f"{path}: voxels are {tuple(zooms)} mm; resampling needs isotropic voxels")
        data = resample_to(data, float(zooms[0]), float(spacing))
    return tissue_contrast(data, seed=seed)
