import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ldae.data.transforms import load_model_ready, read_volume, validate_volume, volume_transforms
from ldae.errors import CohortError
from ldae.io import write_nifti


def _write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    return write_nifti(path, data, np.eye(4) if affine is None else affine)


def test_chain_resamples_orients_pads_and_scales(tmp_path: Path):
    # 20×24×16 at 3 mm, stored LPS-flipped along x: a bright cube in the +x (right) half
    data = np.zeros((20, 24, 16), np.float32)
    data[:8, 10:14, 6:10] = 500.0  # voxel i small = RIGHT side because x axis is flipped below
    data += 100.0
    affine = np.diag([-3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [30.0, -36.0, -24.0]
    path = _write(tmp_path / "v.nii.gz", data, affine)
    out = load_model_ready(path, spacing=6.0, shape=(12, 12, 12))
    assert tuple(out.shape) == (1, 12, 12, 12)
    assert out.dtype == torch.float32
    assert float(out.min()) == pytest.approx(0.0) and float(out.max()) == pytest.approx(1.0)
    # RAS: the bright cube lies at high x indices (right) after reorientation
    arr = out[0].numpy()
    bright = np.argwhere(arr > 0.5)
    assert bright[:, 0].mean() > 6
    # spacing 6 mm in the output affine, axes positive (RAS)
    aff = np.asarray(out.affine)
    np.testing.assert_allclose(np.diag(aff)[:3], [6.0, 6.0, 6.0], atol=1e-5)


def test_identity_chain_keeps_values(tmp_path: Path):
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 1, (8, 10, 6)).astype(np.float32)
    data[0, 0, 0], data[1, 1, 1] = 0.0, 1.0
    path = _write(tmp_path / "v.nii.gz", data, np.diag([2.0, 2.0, 2.0, 1.0]))
    out = volume_transforms(spacing=2.0, shape=(8, 10, 6))({"image": str(path)})["image"]
    np.testing.assert_allclose(out[0].numpy(), data, atol=1e-5)


@pytest.mark.parametrize(
    "data,message",
    [
        (np.ones((8, 8), np.float32), "expected a 3D volume, got 2D"),
        (np.ones((8, 8, 8, 2), np.float32), "expected a 3D volume, got 4D"),
        (np.zeros((8, 8, 8), np.float32), "volume is constant"),
    ],
)
def test_rejects_bad_volumes(tmp_path: Path, data, message):
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(CohortError, match=rf"bad.nii.gz: {message}"):
        read_volume(path)


def test_rejects_nan(tmp_path: Path):
    data = np.ones((8, 8, 8), np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    path = _write(tmp_path / "nan.nii.gz", data)
    with pytest.raises(CohortError, match=r"nan.nii.gz: volume holds 2 NaN/inf voxel"):
        read_volume(path)


def test_trailing_singleton_axis_accepted():
    data = np.arange(8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8, 1)
    assert validate_volume(data).shape == (8, 8, 8)


def test_corrupt_and_truncated_gzip(tmp_path: Path):
    good = _write(tmp_path / "good.nii.gz", np.random.default_rng(0).random((16, 16, 16)).astype(np.float32))
    raw = good.read_bytes()
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CohortError, match=r"trunc.nii.gz: cannot read NIfTI"):
        read_volume(truncated)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti at all" * 10))
    with pytest.raises(CohortError, match=r"garbage.nii.gz: cannot read NIfTI"):
        read_volume(garbage)
    with pytest.raises(CohortError, match="file not found"):
        read_volume(tmp_path / "absent.nii.gz")


def test_transform_error_names_file(tmp_path: Path):
    path = _write(tmp_path / "zero.nii.gz", np.zeros((8, 8, 8), np.float32) + 3.0)
    with pytest.raises(Exception) as info:
        load_model_ready(path, spacing=1.0, shape=(8, 8, 8))
    from ldae.errors import find_user_error

    err = find_user_error(info.value)
    assert err is not None and "zero.nii.gz" in str(err)
