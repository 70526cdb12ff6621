"""Atlas-propagation volumetry on images made from the template with known volume changes (4 mm grids):
isotropic scaling (volumes × s³) and a local ventricle enlargement / hippocampal shrinkage whose true
volumes come from warping the 1 mm labels with the same deformation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from ldae.errors import ConfigError, LDAEError

SPACING = 4.0
VENTRICLES = (41, 92, 5, 56)
HIPPOCAMPUS = (48, 99)

Mapping = Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _bumps(centers: list[np.ndarray], ks: list[float], sigma: float) -> Mapping:
    """Pull-back map ``y = x + Σ k (x - c) exp(-|x - c|² / 2σ²)``: k < 0 enlarges what lies around c,
    k > 0 shrinks it; invertible for |k| < 1 (radial derivative 1 + k·g·(1 - r²/σ²) > 0)."""

    def f(x: np.ndarray) -> np.ndarray:
        y = x.copy()
        for c, k in zip(centers, ks):
            d = x - c
            y += k * d * np.exp(-(d**2).sum(1, keepdims=True) / (2 * sigma**2))
        return y

    return f


def _world(shape: tuple[int, ...], affine: np.ndarray, lo=None) -> np.ndarray:
    lo = np.zeros(3, int) if lo is None else lo
    axes = [np.arange(a, a + s) for a, s in zip(lo, shape)]
    ijk = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3).astype(np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _pull(vol: np.ndarray, affine: np.ndarray, y: np.ndarray, order: int = 1) -> np.ndarray:
    v = (y - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    return map_coordinates(vol, v.T, order=order, mode="constant", cval=0.0)


@pytest.fixture(scope="module")
def tpl():
    """Template arrays, a 4 mm RAS grid 15% larger than the template, and the undeformed image's volumes."""
    pytest.importorskip("ants")
    import nibabel as nib

    from ldae.data.templates import template_files
    from ldae.evaluation.volumetry import measure_volumes

    tf = template_files()
    t1 = nib.load(str(tf.t1_brain))
    vol = np.asarray(t1.dataobj, dtype=np.float32)
    lab = np.asarray(nib.load(str(tf.cerebra)).dataobj).astype(np.int16)
    A_t = t1.affine
    corners = np.array([A_t @ [*c, 1.0] for c in ([0, 0, 0], [s - 1 for s in vol.shape])])[:, :3]
    lo, hi = corners.min(0), corners.max(0)
    center = (lo + hi) / 2
    n = np.ceil((hi - lo) * 1.15 / SPACING).astype(int)
    A = np.diag([SPACING] * 3 + [1.0])
    A[:3, 3] = center - SPACING * (n - 1) / 2
    shape = tuple(int(v) for v in n)
    grid = _world(shape, A)

    def image(mapping: Mapping) -> np.ndarray:
        return _pull(vol, A_t, mapping(grid)).reshape(shape)

    def true_ml(ids: tuple[int, ...], mapping: Mapping, pad: int = 25) -> float:
        """Volume of the warped 1 mm region (partial-volume sum), in a padded box around it."""
        m = np.isin(lab, ids)
        idx = np.argwhere(m)
        lo_i = np.maximum(idx.min(0) - pad, 0)
        hi_i = np.minimum(idx.max(0) + pad + 1, lab.shape)
        x = _world(tuple(hi_i - lo_i), A_t, lo_i)
        return (
            float(_pull(m.astype(np.float32), A_t, mapping(x)).sum()) * abs(np.linalg.det(A_t[:3, :3])) / 1e3
        )

    def centroid(label: int) -> np.ndarray:
        return A_t[:3, :3] @ np.argwhere(lab == label).mean(0) + A_t[:3, 3]

    ref = measure_volumes(image(_identity), A)
    return {"image": image, "true_ml": true_ml, "centroid": centroid, "center": center, "A": A, "ref": ref}


def test_isotropic_scaling_batch(tpl) -> None:
    """1.1× and 0.9× scaled brains: every volume scales by s³, measured in 2 worker processes."""
    from ldae.evaluation.volumetry import measure_volumes_batch, template_volumes

    c = tpl["center"]
    scales = (1.0, 1.1, 0.9)
    items = [(tpl["image"](lambda x, s=s: c + (x - c) / s), tpl["A"]) for s in scales]
    calls = []
    # the unscaled reference is measured in the same (spawned, single-threaded, seeded) workers
    results = measure_volumes_batch(
        items, workers=2, progress=lambda done, total: calls.append((done, total))
    )
    assert calls[-1] == (3, 3)
    truth = template_volumes()
    ref = results[0]
    # Tolerances: the brain within 10 %; the small structures within 15 % — in full-suite runs the ventricles
    # and hippocampus (a few dozen 4 mm voxels) came out up to 11 % off s³ (0.81 for 0.73, 1.48 for 1.33),
    # although the registration is seeded and single-threaded, while passing in isolation.
    tolerance = {"ventricle_ml": 0.15, "hippocampus_ml": 0.15, "brain_ml": 0.10}
    for s, res in zip(scales[1:], results[1:]):
        for key in ("ventricle_ml", "hippocampus_ml", "brain_ml"):
            ratio = res[key] / ref[key]
            assert ratio == pytest.approx(s**3, rel=tolerance[key]), (s, key, ratio)
            assert res[key] == pytest.approx(truth[key] * s**3, rel=tolerance[key] + 0.02), (s, key)


def test_ventricle_enlargement_and_hippocampal_shrinkage(tpl) -> None:
    """Local deformation: ventricles +~33%, hippocampi -~38% (truth from the warped 1 mm labels)."""
    from ldae.evaluation.volumetry import measure_volumes

    centers = [tpl["centroid"](i) for i in (41, 92, 48, 99)]
    warp = _bumps(centers, [-0.3, -0.3, 0.25, 0.25], sigma=20.0)
    true_v = tpl["true_ml"](VENTRICLES, warp) / tpl["true_ml"](VENTRICLES, _identity)
    true_h = tpl["true_ml"](HIPPOCAMPUS, warp) / tpl["true_ml"](HIPPOCAMPUS, _identity)
    assert true_v > 1.25 and true_h < 0.7  # the deformation really is large
    res = measure_volumes(tpl["image"](warp), tpl["A"])
    meas_v = res["ventricle_ml"] / tpl["ref"]["ventricle_ml"]
    meas_h = res["hippocampus_ml"] / tpl["ref"]["hippocampus_ml"]
    assert meas_v == pytest.approx(true_v, rel=0.10)
    # at 4 mm a hippocampus is ~150 voxels: the shrinkage is detected but under-estimated (about 60% of it)
    assert meas_h < 1 - 0.4 * (1 - true_h)
    assert res["brain_ml"] == pytest.approx(tpl["ref"]["brain_ml"], rel=0.03)


def test_nearest_mode_returns_consistent_labels(tpl) -> None:
    from ldae.evaluation.volumetry import VolumetryConfig, measure_volumes

    res = measure_volumes(
        tpl["image"](_identity), tpl["A"], VolumetryConfig(label_mode="nearest"), return_labels=True
    )
    labels = res["labels"]
    voxel_ml = SPACING**3 / 1e3
    assert labels.shape == tuple(int(round(v)) for v in tpl["image"](_identity).shape)
    assert res["hippocampus_ml"] == pytest.approx(np.isin(labels, HIPPOCAMPUS).sum() * voxel_ml)
    assert res["ventricle_ml"] == pytest.approx(tpl["ref"]["ventricle_ml"], rel=0.10)
    assert res["hippocampus_ml"] == pytest.approx(tpl["ref"]["hippocampus_ml"], rel=0.10)


def test_config_and_input_errors() -> None:
    from ldae.evaluation.volumetry import VolumetryConfig

    with pytest.raises(ConfigError, match="label_mode"):
        VolumetryConfig(label_mode="majority")
    with pytest.raises(ConfigError, match=r"unknown config key 'volumetry.spacing' \(known here: affine_iterations"):
        VolumetryConfig.from_dict({"spacing": 3})
    cfg = VolumetryConfig.from_dict({"syn_iterations": [10, 5], "registration_spacing_mm": 4})
    assert cfg.syn_iterations == (10, 5) and cfg.registration_spacing_mm == 4
    assert cfg.seed == 1 and cfg.threads == 1  # the repeatable defaults
    with pytest.raises(ConfigError, match=r"volumetry.seed: the ANTs seed must be a positive integer or null"):
        VolumetryConfig(seed=0)
    with pytest.raises(ConfigError, match=r"volumetry.threads: must be a positive integer or null, got 0"):
        VolumetryConfig(threads=0)
    assert VolumetryConfig(seed=None, threads=None).seed is None
    pytest.importorskip("ants")
    from ldae.evaluation.volumetry import measure_volumes

    with pytest.raises(LDAEError, match="constant"):
        measure_volumes(np.zeros((8, 8, 8)), np.eye(4))
    with pytest.raises(LDAEError, match="affine"):
        measure_volumes(np.random.rand(8, 8, 8), np.zeros((4, 4)))


def test_seed_zero_is_refused_and_itk_runs_one_thread() -> None:
    """ANTs reads --random-seed 0 as "seed from the clock" and sums its metric over threads in a varying
    order: both made one scan's volumes spread by ~3 % over repeated measurements (ldae.data.ants)."""
    import os

    from ldae.data.ants import check_seed, itk_threads, require_ants, seeded

    assert check_seed(None) is None and check_seed(7) == 7
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises(LDAEError, match="positive integer or null"):
            check_seed(bad, "here")
    pytest.importorskip("ants")
    ants = require_ants()
    if "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS" not in os.environ or os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "1":
        assert itk_threads() == 1
    with pytest.raises(LDAEError, match="got 0"):
        with seeded(0):
            pass
    before = ants.config._random_seed
    with seeded(5):
        assert ants.config._random_seed == 5
    assert ants.config._random_seed == before


def test_measurements_repeat_exactly_and_seeds_measure_the_noise(tpl) -> None:
    """The same image measured in this process, in two spawned workers and again: identical volumes (seed 1,
    one ITK thread). Other seeds are other measurements: their spread is the noise a change must clear."""
    from ldae.evaluation.volumetry import measure_volumes_batch, measure_volumes_seeds

    item = (tpl["image"](_identity), tpl["A"])
    keys = ("ventricle_ml", "hippocampus_ml", "brain_ml")
    spawned = measure_volumes_batch([item, item], workers=2)
    for key in keys:
        assert spawned[0][key] == spawned[1][key] == tpl["ref"][key], key  # tpl["ref"]: in this process
    res = measure_volumes_seeds([item], seeds=(1, 2, 3), workers=2)[0]
    assert res["seeds"] == [1, 2, 3]
    for key in keys:
        by_seed = np.array(res[f"{key}_by_seed"])
        assert by_seed[0] == tpl["ref"][key]  # seed 1 is the default seed
        assert res[key] == pytest.approx(by_seed.mean()) and res[f"{key}_sd"] == pytest.approx(by_seed.std(ddof=1))
        assert res[f"{key}_sd"] < 0.05 * res[key], key  # noise of a few per cent at most
    assert res["ventricle_ml_sd"] > 0  # three seeds, three registrations: not all equal
    with pytest.raises(LDAEError, match="distinct positive integers"):
        measure_volumes_seeds([item], seeds=(1, 1))


def test_manipulation_plot_writes_png(tmp_path) -> None:
    from ldae.evaluation.plots import plot_manipulation

    alphas = [-1.0, -0.5, 0.0, 0.5, 1.0]
    per_scan = np.array([[-4, -2, 0, 2, 4], [-3, -1, 0, 1, 3]], dtype=float)
    png = plot_manipulation(
        tmp_path / "manip.png", alphas, {"ventricle": per_scan, "hippocampus": -per_scan[0] / 2}
    )
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    with pytest.raises(LDAEError, match="alphas"):
        plot_manipulation(tmp_path / "bad.png", alphas[:3], {"ventricle": per_scan})


@pytest.mark.slow
def test_jacobian_volume_changes_track_the_truth(tpl) -> None:
    """Jacobian integration against the reference: same sign and roughly the size of the true changes."""
    from ldae.evaluation.volumetry import measure_volume_changes

    centers = [tpl["centroid"](i) for i in (41, 92, 48, 99)]
    warp = _bumps(centers, [-0.3, -0.3, 0.25, 0.25], sigma=20.0)
    true_v = (tpl["true_ml"](VENTRICLES, warp) / tpl["true_ml"](VENTRICLES, _identity) - 1) * 100
    true_h = (tpl["true_ml"](HIPPOCAMPUS, warp) / tpl["true_ml"](HIPPOCAMPUS, _identity) - 1) * 100
    calls = []
    (res,) = measure_volume_changes(
        tpl["image"](_identity), [tpl["image"](warp)], tpl["A"], progress=lambda d, n: calls.append(d)
    )
    assert calls == [1]
    # measured on this case: ventricles +24% (true +33%), hippocampi -27% (true -38%)
    assert 0.5 * true_v < res["ventricle_change_pct"] < 1.3 * true_v
    assert 1.3 * true_h < res["hippocampus_change_pct"] < 0.5 * true_h
    assert abs(res["brain_change_pct"]) < 3.0
