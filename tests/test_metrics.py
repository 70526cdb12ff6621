"""SSIM/PSNR/MSE against independent references (scikit-image, numpy closed forms)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldae.metrics import gaussian_kernel1d, mse, psnr, reconstruction_metrics, ssim3d


def _pair(shape=(2, 1, 16, 20, 14), seed=0):
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.random(shape), sigma=(0, 0, 1.5, 1.5, 1.5))
    x = (x - x.min()) / (x.max() - x.min())
    y = np.clip(x + 0.08 * rng.standard_normal(shape) + 0.05 * np.sin(np.arange(shape[-1])), 0, 1)
    return x.astype(np.float32), y.astype(np.float32)


def _skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
    )


def test_ssim_matches_skimage_per_sample() -> None:
    x, y = _pair()
    ours = ssim3d(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    ref = [_skimage_ssim(x[i, 0].astype(np.float64), y[i, 0].astype(np.float64)) for i in range(len(x))]
    assert ours.shape == (2,)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert 0.2 < ref[0] < 0.99  # a non-trivial pair


def test_ssim_identity_channels_and_4d_input() -> None:
    x, y = _pair((1, 2, 12, 12, 12), seed=1)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    assert ssim3d(tx, tx).item() == pytest.approx(1.0, abs=1e-6)
    per_channel = [_skimage_ssim(x[0, c].astype(np.float64), y[0, c].astype(np.float64)) for c in range(2)]
    assert ssim3d(tx, ty).item() == pytest.approx(np.mean(per_channel), abs=1e-6)
    assert ssim3d(tx[:, 0], ty[:, 0]).item() == pytest.approx(per_channel[0], abs=1e-6)


def test_ssim_rejects_small_and_mismatched() -> None:
    with pytest.raises(ValueError, match=">= 11"):
        ssim3d(torch.zeros(1, 1, 10, 12, 12), torch.zeros(1, 1, 10, 12, 12))
    with pytest.raises(ValueError, match="differ in shape"):
        ssim3d(torch.zeros(1, 1, 12, 12, 12), torch.zeros(1, 1, 12, 12, 13))


def test_kernel_is_scipy_gaussian() -> None:
    impulse = np.zeros(31)
    impulse[15] = 1.0
    ref = gaussian_filter(impulse, sigma=1.5, truncate=3.5, mode="constant")[10:21]
    np.testing.assert_allclose(gaussian_kernel1d().numpy(), ref, atol=1e-12)


def test_mse_psnr_closed_form_and_skimage() -> None:
    x, y = _pair()
    ref_mse = ((x.astype(np.float64) - y) ** 2).reshape(2, -1).mean(axis=1)
    np.testing.assert_allclose(mse(torch.from_numpy(x), torch.from_numpy(y)).numpy(), ref_mse, rtol=1e-6)
    ref_psnr = [peak_signal_noise_ratio(x[i], y[i], data_range=1.0) for i in range(2)]
    np.testing.assert_allclose(psnr(torch.from_numpy(x), torch.from_numpy(y)).numpy(), ref_psnr, rtol=1e-5)
    assert torch.isinf(psnr(torch.ones(1, 4, 4, 4), torch.ones(1, 4, 4, 4))).all()
    m = reconstruction_metrics(torch.from_numpy(x), torch.from_numpy(y))
    assert set(m) == {"ssim", "psnr", "mse"} and all(v.shape == (2,) for v in m.values())
