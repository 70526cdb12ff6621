"""Batched image-quality metrics for 3D volumes in [0, 1]: SSIM, PSNR, MSE (torch, any device).

Inputs are ``(B, C, D, H, W)`` or ``(B, D, H, W)`` tensors; every function returns one value per
sample (``Tensor[B]``, float32), averaging over channels and voxels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_5d(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim == 4:
        x = x.unsqueeze(1)
    if x.ndim != 5:
        raise ValueError(f"{name}: expected (B, C, D, H, W) or (B, D, H, W), got shape {tuple(x.shape)}")
    return x


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_5d(x, "x"), _as_5d(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def gaussian_kernel1d(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> torch.Tensor:
    """Normalised 1D Gaussian taps on ``[-r, r]``, ``r = int(truncate * sigma + 0.5)`` (scipy.ndimage's
    radius rule; 11 taps for sigma 1.5)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur_valid(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter over the 3 spatial axes, 'valid' (output shrinks by 2r per axis)."""
    b, c = x.shape[:2]
    out = x.reshape(b * c, 1, *x.shape[2:])
    n = kernel.numel()
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = n
        out = F.conv3d(out, kernel.to(out.dtype).view(shape))
    return out.reshape(b, c, *out.shape[2:])


def ssim3d(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    sigma: float = SSIM_SIGMA,
    truncate: float = SSIM_TRUNCATE,
) -> torch.Tensor:
    """Mean structural similarity per sample, 3D Gaussian-weighted (Wang et al. 2004).

    Conventions (identical to ``skimage.metrics.structural_similarity(x, y, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1)`` on each 3D volume):
    separable Gaussian window, sigma 1.5, truncated at 3.5 sigma (11 taps); K1 = 0.01, K2 = 0.03,
    C1 = (K1 * data_range)^2, C2 = (K2 * data_range)^2; population (not sample) covariances; the SSIM
    map is averaged only where the whole window lies inside the volume (skimage crops a border of
    radius r = 5 voxels), so no padding convention enters. Channels are averaged. Computed in float64
    for accuracy; every spatial size must be at least 2r + 1 = 11.
    """
    x, y = _check_pair(x, y)
    kernel = gaussian_kernel1d(sigma, truncate).to(x.device)
    if min(x.shape[2:]) < kernel.numel():
        raise ValueError(f"ssim3d needs every spatial size >= {kernel.numel()}, got {tuple(x.shape[2:])}")
    x = x.double()
    y = y.double()
    # one blur call for the five moments (stacked on the channel axis)
    c = x.shape[1]
    moments = _blur_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), kernel)
    ux, uy, uxx, uyy, uxy = moments.split(c, dim=1)
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1).float()


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample."""
    x, y = _check_pair(x, y)
    return (x.double() - y.double()).pow(2).flatten(1).mean(dim=1).float()


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per sample in dB, ``10 log10(data_range^2 / MSE)`` (inf when equal)."""
    err = mse(x, y).double()
    return (10.0 * torch.log10(torch.as_tensor(data_range**2, dtype=torch.float64) / err)).float()


def reconstruction_metrics(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> dict[str, torch.Tensor]:
    """``{'ssim', 'psnr', 'mse'}`` per sample (used by validation and evaluation tables)."""
    return {"ssim": ssim3d(x, y, data_range), "psnr": psnr(x, y, data_range), "mse": mse(x, y)}


__all__ = ["gaussian_kernel1d", "mse", "psnr", "reconstruction_metrics", "ssim3d"]
