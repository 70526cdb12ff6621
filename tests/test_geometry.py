"""Model-ready geometry in world space (issue 21, cases 1 and 5): scans are resampled onto the model's MNI
grid by their affine; affines that cannot place a scan and fields of view that miss the brain are refused
with the file named; the intensity rule is robust to a few extreme voxels.

The reference anatomy is analytic (a function of world millimetres), so "the same anatomy on another grid"
is exact: sampling it on a 1 mm, a 1.5 mm or a flipped grid gives the same brain in MNI space.
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ldae.cli import main
from ldae.data.geometry import MNI_BRAIN_CENTRE, ModelGrid, field_of_view, model_grid_affine
from ldae.data.transforms import load_model_ready, robust_scale
from ldae.errors import CohortError
from ldae.io import write_nifti

#: the 1 mm MNI152 grid of FSL's templates (182 x 218 x 182, origin -90, -126, -72)
MNI152_1MM = np.array([[1.0, 0, 0, -90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def world_anatomy(affine: np.ndarray, shape: tuple[int, ...], severity: float = 0.5) -> np.ndarray:
    """A brain-like phantom defined in world mm (MNI-centred ellipsoid 'brain' at 0.8 with two 'ventricles'
    at 0.2, smooth edges), sampled at the voxel centres of ``(affine, shape)``."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")).reshape(3, -1)
    w = affine[:3, :3].astype(np.float32) @ idx + affine[:3, 3:4].astype(np.float32)
    x, y, z = w - np.asarray(MNI_BRAIN_CENTRE, np.float32)[:, None]
    edge = 2.0  # mm: a soft boundary, like a real scan's partial-volume edge

    def inside(r2: np.ndarray, radius: float) -> np.ndarray:  # ~80 mm per unit of normalised radius
        return 1.0 / (1.0 + np.exp(np.clip((np.sqrt(r2) - radius) * 80.0 / edge, -50, 50)))

    brain = inside((x / 74.0) ** 2 + (y / 99.0) ** 2 + (z / 70.0) ** 2, 1.0)
    r = 0.12 + 0.1 * severity
    vent = np.maximum(inside(((x - 16.7) / 93) ** 2 + (y / 117) ** 2 / 2.5 + (z / 93) ** 2, r),
                      inside(((x + 16.7) / 93) ** 2 + (y / 117) ** 2 / 2.5 + (z / 93) ** 2, r))
    return (0.8 * brain - 0.6 * brain * vent).reshape(shape).astype(np.float32)


def _inside_fov(grid: ModelGrid, affine: np.ndarray, shape: tuple[int, ...], margin: float) -> np.ndarray:
    """Model-grid voxels lying at least ``margin`` mm inside an input's field of view."""
    lo, hi = field_of_view(affine, shape)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij")).reshape(3, -1)
    w = grid.affine[:3, :3] @ idx + grid.affine[:3, 3:4]
    return ((w >= lo[:, None] + margin) & (w <= hi[:, None] - margin)).all(0).reshape(grid.shape)


# ------------------------------------------------------------------------------------------ the grid
def test_mni_brain_centre_is_the_template_brain_box_centre():
    pytest.importorskip("ants", reason="ldae.jobs.preprocess needs ANTsPy at import")
    from ldae.jobs.preprocess import mni_grid, template_brain_centre

    try:
        centre = template_brain_centre()
    except Exception as exc:  # templates not installed
        pytest.skip(f"bundled templates unavailable: {exc}")
    np.testing.assert_allclose(centre, MNI_BRAIN_CENTRE, atol=1e-6)
    np.testing.assert_allclose(mni_grid(1.5, (128, 160, 128)), model_grid_affine(1.5, (128, 160, 128)), atol=1e-9)


def test_model_grid_affine_is_centred_on_the_mni_brain():
    a = model_grid_affine(1.5, (128, 160, 128))
    np.testing.assert_allclose(a @ np.array([63.5, 79.5, 63.5, 1.0]), [*MNI_BRAIN_CENTRE, 1.0])
    np.testing.assert_allclose(np.diag(a)[:3], 1.5)
    b = model_grid_affine(6.0, (32, 40, 32))  # the tiny grid spans the same 192 x 240 x 192 mm
    np.testing.assert_allclose(b @ np.array([15.5, 19.5, 15.5, 1.0]), [*MNI_BRAIN_CENTRE, 1.0])


# ------------------------------------------------------------------------------- same anatomy, any grid
def test_same_anatomy_on_1mm_and_15mm_grids_gives_the_same_model_ready_volume(tmp_path: Path):
    """1 mm (182 x 218 x 182, MNI152 origin) and 1.5 mm (the paper's grid): the model-ready volumes agree
    within interpolation error wherever the 1 mm scan has data; the former centre crop/pad put the brain
    18 mm off (checked: a shifted copy is far outside that tolerance)."""
    grid = ModelGrid.of(1.5, (128, 160, 128))
    p1 = write_nifti(tmp_path / "one_mm.nii.gz", world_anatomy(MNI152_1MM, (182, 218, 182)), MNI152_1MM)
    p15 = write_nifti(tmp_path / "paper.nii.gz", world_anatomy(grid.affine, grid.shape), grid.affine)
    v1 = load_model_ready(p1, 1.5, grid.shape)[0].numpy()
    v15 = load_model_ready(p15, 1.5, grid.shape)[0].numpy()
    np.testing.assert_allclose(np.asarray(load_model_ready(p1, 1.5, grid.shape).affine), grid.affine, atol=1e-6)
    inside = _inside_fov(grid, MNI152_1MM, (182, 218, 182), margin=2.0)
    err = np.abs(v1 - v15)[inside]
    assert err.mean() < 2e-3 and np.quantile(err, 0.999) < 0.03, (err.mean(), err.max())
    shifted = np.roll(v15, 12, axis=2)  # 18 mm in z: what centre cropping did to a 182x218x182 scan
    assert np.abs(v1 - shifted)[inside].mean() > 20 * err.mean()


def test_orientation_and_oversized_field_of_view_are_handled_by_the_affine(tmp_path: Path):
    """The same anatomy stored LPS with permuted axes, and on a larger (oversized) 6 mm grid, gives the
    model-ready volume of the model's own grid."""
    grid = ModelGrid.of(6.0, (32, 40, 32))
    ref = load_model_ready(write_nifti(tmp_path / "ref.nii.gz", world_anatomy(grid.affine, grid.shape),
                                       grid.affine), 6.0, grid.shape)[0].numpy()
    # voxel axes (j, i, k) = (A, R flipped, S): a permuted, partly flipped affine
    lps = np.zeros((4, 4))
    lps[0, 1], lps[1, 0], lps[2, 2], lps[3, 3] = -6.0, 6.0, 6.0, 1.0
    lps[:3, 3] = grid.affine[:3, 3] + [6.0 * 31, 0.0, 0.0]
    data = world_anatomy(lps, (40, 32, 32))
    out = load_model_ready(write_nifti(tmp_path / "lps.nii.gz", data, lps), 6.0, grid.shape)[0].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)
    big = model_grid_affine(6.0, (48, 56, 48))  # 8 voxels more on each side: crop, no interpolation error
    out = load_model_ready(write_nifti(tmp_path / "big.nii.gz", world_anatomy(big, (48, 56, 48)), big),
                           6.0, grid.shape)[0].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)


# ---------------------------------------------------------------------------------------- refusals
def _bad_scan(tmp_path: Path, kind: str) -> Path:
    grid = ModelGrid.of(6.0, (32, 40, 32))
    data = world_anatomy(grid.affine, grid.shape)
    path = tmp_path / f"{kind}.nii.gz"
    if kind == "identity":
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    elif kind == "no_affine":
        nib.save(nib.Nifti1Image(data, None), str(path))  # qform_code = sform_code = 0
    elif kind == "zero_pixdim":  # placed by its qform; nibabel would read pixdim 0 as 1 mm
        img = nib.Nifti1Image(data, None)
        img.header["pixdim"][1:4] = [6.0, 0.0, 6.0]
        img.header["qform_code"], img.header["sform_code"] = 1, 0
        img.header["qoffset_x"], img.header["qoffset_y"], img.header["qoffset_z"] = grid.affine[:3, 3]
        nib.save(img, str(path))
    elif kind == "singular":
        affine = grid.affine.copy()
        affine[:3, 2] = affine[:3, 0]
        nib.save(nib.Nifti1Image(data, affine), str(path))
    elif kind == "partial":  # only the upper half of the brain (z > centre)
        affine = grid.affine.copy()
        affine[2, 3] = MNI_BRAIN_CENTRE[2]
        nib.save(nib.Nifti1Image(data[:, :, :16], affine), str(path))
    elif kind == "folder":
        path.mkdir()
    return path


REFUSALS = {
    "identity": r"identity affine",
    "no_affine": r"the NIfTI header has no world coordinates \(qform_code and sform_code are 0\)",
    "zero_pixdim": r"degenerate affine \(voxel size",
    "singular": r"degenerate affine \(singular",
    "partial": r"field of view \(.*\) does not cover the brain on the model's grid",
    "folder": r"is a folder, not a NIfTI file",
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_scans_that_cannot_be_placed_on_the_grid_are_refused_naming_the_file(kind: str, tmp_path: Path):
    from ldae.errors import find_user_error

    path = _bad_scan(tmp_path, kind)
    with pytest.raises(Exception) as info:  # MONAI wraps errors raised inside its transforms
        load_model_ready(path, 6.0, (32, 40, 32))
    err = find_user_error(info.value)
    assert isinstance(err, CohortError) and re.search(rf"{kind}\.nii\.gz: {REFUSALS[kind]}", str(err)), info.value


def test_check_names_the_rows_that_cannot_be_resampled_and_accepts_mixed_grids(phantom_cohort: Path, capsys):
    """Rows on two grids (6 mm and an oversized 3 mm one) pass, reported per grid; an identity-affine row
    and a partial one make `ldae check` fail naming their CSV rows."""
    import json

    import pandas as pd

    df = pd.read_csv(phantom_cohort)
    fine = model_grid_affine(3.0, (70, 84, 70))
    victim = phantom_cohort.parent / df["path"].iloc[1]
    write_nifti(victim, world_anatomy(fine, (70, 84, 70)), fine)
    assert main(["check", str(phantom_cohort), "--json"]) == 0
    grids = json.loads(capsys.readouterr().out)["volume_grids"]
    assert grids == {"6x6x6 mm 32x40x32": "rows 2, 4-13", "3x3x3 mm 70x84x70": "row 3"}
    for i, kind in ((4, "identity"), (7, "partial")):
        _bad_scan(phantom_cohort.parent, kind).replace(phantom_cohort.parent / df["path"].iloc[i])
    code = main(["check", str(phantom_cohort)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "2 scan(s) cannot be used" in err and "row 6: " in err and "identity affine" in err
    assert "row 9: " in err and "does not cover the brain" in err


# ------------------------------------------------------------------------------------------ intensities
def test_robust_scale_is_x_over_p995_of_nonzero_voxels():
    rng = np.random.default_rng(0)
    x = np.zeros((20, 20, 20), np.float32)
    x[5:15, 5:15, 5:15] = rng.uniform(100, 200, (10, 10, 10))
    p = np.percentile(x[x != 0].astype(np.float64), 99.5)
    np.testing.assert_allclose(robust_scale(x), np.clip(x / p, 0, 1), atol=1e-6)
    neg = x - 50.0 * (x != 0)  # some negative values: lo = P0.5 of the nonzero voxels
    lo, hi = np.percentile(neg[neg != 0].astype(np.float64), [0.5, 99.5])
    np.testing.assert_allclose(robust_scale(neg), np.clip((neg - min(lo, 0)) / (hi - min(lo, 0)), 0, 1), atol=1e-6)


def test_one_hot_voxel_cannot_hijack_the_scaling_and_huge_values_stay_finite(tmp_path: Path):
    grid = ModelGrid.of(6.0, (32, 40, 32))
    data = world_anatomy(grid.affine, grid.shape)
    ref = load_model_ready(write_nifti(tmp_path / "ref.nii.gz", data, grid.affine), 6.0, grid.shape)[0].numpy()
    hot = data.copy()
    hot[16, 20, 16] = 1e6
    out = load_model_ready(write_nifti(tmp_path / "hot.nii.gz", hot, grid.affine), 6.0, grid.shape)[0].numpy()
    others = np.ones(out.shape, bool)
    others[16, 20, 16] = False
    assert np.abs(out - ref)[others].max() < 1e-3  # min-max would have divided everything by 1e6
    assert out[16, 20, 16] == pytest.approx(1.0)
    huge = (data / data.max() * 3.0e38).astype(np.float32)
    huge[0, 0, 0] = -3.0e38
    out = load_model_ready(write_nifti(tmp_path / "huge.nii.gz", huge, grid.affine), 6.0, grid.shape)[0].numpy()
    assert np.isfinite(out).all() and 0.0 <= out.min() and out.max() <= 1.0
    np.testing.assert_allclose(np.delete(out.ravel(), 0), np.delete(ref.ravel(), 0), atol=2e-3)


# ------------------------------------------------------------------------------- the tiny model's y_sem
def test_tiny_model_gives_the_same_y_sem_for_the_same_anatomy_on_1mm_and_15mm_grids(tiny_run: Path, tmp_path: Path):
    """The trained tiny LDAE (6 mm grid) reads the anatomy written on a 1 mm MNI152 grid and on the paper's
    1.5 mm grid as the same model-ready volume, and encodes both to the same y_sem: measured in units of the
    cohort's per-dimension y_sem spread, their difference is a small fraction of the typical distance
    between two cohort scans and of the effect of the anatomy's own 'disease' (ventricle size). (The fixture
    model is trained for one epoch and is almost blind to an 18 mm shift, so the shift is checked on the
    volumes: that is what the former centre crop/pad got wrong.)"""
    from ldae.data.cohort import read_cohort
    from ldae.model import LDAE

    model = LDAE.load(tiny_run)
    paper = model_grid_affine(1.5, (128, 160, 128))
    scans = {
        "1mm": write_nifti(tmp_path / "one_mm.nii.gz", world_anatomy(MNI152_1MM, (182, 218, 182), 1.0), MNI152_1MM),
        "1.5mm": write_nifti(tmp_path / "paper.nii.gz", world_anatomy(paper, (128, 160, 128), 1.0), paper),
        "healthy": write_nifti(tmp_path / "healthy.nii.gz", world_anatomy(paper, (128, 160, 128), 0.0), paper),
    }
    shift = paper.copy()
    shift[2, 3] += 18.0
    scans["shifted"] = write_nifti(tmp_path / "shifted.nii.gz", world_anatomy(paper, (128, 160, 128), 1.0), shift)
    x = {k: model.load_volume(p)[0] for k, p in scans.items()}
    same_volume = float((x["1mm"] - x["1.5mm"]).abs().mean())
    assert same_volume < 2e-3 and float((x["shifted"] - x["1.5mm"]).abs().mean()) > 30 * same_volume
    cohort = [model.load_volume(p)[0] for p in read_cohort(tiny_run.parent / "cohort" / "cohort.csv")["path"]]
    with torch.no_grad():
        y = {k: model.semantic(v).double()[0] for k, v in x.items()}
        ys = torch.cat([model.semantic(v).double() for v in cohort])
    sd = ys.std(dim=0)

    def dist(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((a - b) / sd).norm())

    typical = float(np.mean([dist(ys[i], ys[j]) for i in range(len(ys)) for j in range(i)]))
    same, disease = dist(y["1mm"], y["1.5mm"]), dist(y["healthy"], y["1.5mm"])
    print(f"y_sem distance (cohort sd units): 1 mm vs 1.5 mm {same:.2f}, ventricles {disease:.2f}, "
          f"cohort pairs {typical:.2f}")
    assert same < 0.2 * typical and same < 0.1 * disease, (same, typical, disease)
