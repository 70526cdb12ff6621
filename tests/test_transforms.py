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


def test_chain_resamples_by_affine_orients_and_scales(tmp_path: Path):
    """A 3 mm scan stored LPS (x flipped) with a bright cube on the RIGHT at a known world position lands
    on the model's grid (6 mm, MNI-centred) at that position; the output affine is the model's grid."""
    from ldae.data.geometry import model_grid_affine

    target = model_grid_affine(6.0, (12, 12, 12))
    affine = np.diag([-3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [45.0, -17.0 - 36.0, 5.0 - 36.0]  # x: 45 .. -45 mm (LPS), y, z around the MNI centre
    data = np.full((31, 25, 25), 100.0, np.float32)
    cube_world = np.array([24.0, -17.0, 5.0])  # 24 mm to the right of the midline
    centre_vox = np.linalg.solve(affine[:3, :3], cube_world - affine[:3, 3])
    lo = np.rint(centre_vox - 3).astype(int)
    data[lo[0]:lo[0] + 7, lo[1]:lo[1] + 7, lo[2]:lo[2] + 7] = 500.0
    path = _write(tmp_path / "v.nii.gz", data, affine)
    out = load_model_ready(path, spacing=6.0, shape=(12, 12, 12))
    assert tuple(out.shape) == (1, 12, 12, 12)
    assert out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) == pytest.approx(1.0)
    np.testing.assert_allclose(np.asarray(out.affine), target, atol=1e-6)
    arr = out[0].numpy()
    bright = np.argwhere(arr > 0.6).mean(axis=0)  # centroid of the cube on the model's grid
    world = target[:3, :3] @ bright + target[:3, 3]
    assert np.abs(world - cube_world).max() <= 3.0  # within half a model voxel, on the right (x > 0)
    assert world[0] > 15


def test_model_grid_input_keeps_values_up_to_the_intensity_rule(tmp_path: Path):
    """A scan already on the model's grid is not interpolated: only the robust [0, 1] scaling applies."""
    from ldae.data.geometry import model_grid_affine
    from ldae.data.transforms import robust_scale

    rng = np.random.default_rng(0)
    data = rng.uniform(0, 1, (8, 10, 6)).astype(np.float32)
    data[0, 0, 0], data[1, 1, 1] = 0.0, 1.0
    path = _write(tmp_path / "v.nii.gz", data, model_grid_affine(2.0, (8, 10, 6)))
    out = volume_transforms(spacing=2.0, shape=(8, 10, 6))({"image": str(path)})["image"]
    nonzero = data[data != 0]
    expected = np.clip(data / np.percentile(nonzero.astype(np.float64), 99.5), 0, 1)
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(robust_scale(data), expected, atol=1e-6)


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
