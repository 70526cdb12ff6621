"""Model-ready geometry in world space: the model's grid, the checks an input's affine must pass, and the
resampling of any scan onto that grid by its affine.

**The model's grid.** A model-ready volume lives on a fixed grid in MNI ICBM 2009c space (RAS, mm): isotropic
(or per-axis) ``spacing``, ``shape`` voxels, and voxel centre ``(shape - 1) / 2`` on the centre of the
template brain's bounding box, :data:`MNI_BRAIN_CENTRE` = (0, -17, 5) mm. Its affine is

    A = [[s_x, 0, 0, c_x - s_x (n_x - 1) / 2], [0, s_y, 0, ...], [0, 0, s_z, ...], [0, 0, 0, 1]].

The paper's grid (1.5 mm, 128 x 160 x 128), the tiny preset's (6 mm, 32 x 40 x 32), the synthetic cohort and
``ldae preprocess`` all use this one definition, so a scan written on the model's grid passes unchanged.

**Resampling.** Any other input is resampled onto the grid *by its affine*: output voxel ``j`` takes the
input's value at voxel ``A_in^-1 A j`` (trilinear; zero outside the input's field of view), so the same
anatomy on a 1 mm and a 1.5 mm grid gives the same model-ready volume up to interpolation error. When the
input is finer than the grid along an axis by a factor ``f > 1`` it is first low-passed with a Gaussian of
``σ = (f - 1) / 2`` input voxels (the usual anti-aliasing rule; without it a 1 mm scan sampled at 6 mm keeps
only every sixth voxel's noise). Orientation (LPS, flipped or permuted axes) is handled by the affine.

**Refusals** (one line naming the file): a NIfTI without world coordinates (qform and sform codes both 0), an
identity affine (voxel indices, not millimetres), a degenerate one (zero pixdim, singular, non-finite), and a
field of view that does not cover the brain's bounding box on the model's grid (a partial scan, or a scan not
in MNI space). A larger field of view is fine: what lies outside the grid is cropped by the resampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldae.errors import CohortError

#: world (RAS, mm) centre of the bounding box of the ICBM 2009c brain mask (tests check it against the
#: bundled template, :func:`ldae.jobs.preprocess.template_brain_centre`)
MNI_BRAIN_CENTRE = (0.0, -17.0, 5.0)
#: half the extent (mm) of that bounding box (voxel centres of the 1 mm mask): the brain spans
#: x -72..72, y -107..73, z -72..82
MNI_BRAIN_HALF_EXTENT = (72.0, 90.0, 77.0)
#: spacing and shape of the paper's grid (the default of `ldae check`, which has no model)
PAPER_GRID = (1.5, (128, 160, 128))


@dataclass(frozen=True)
class ModelGrid:
    """A model's grid: ``spacing`` (mm per axis) and ``shape`` (voxels), centred on ``centre`` (mm)."""

    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    centre: tuple[float, float, float] = MNI_BRAIN_CENTRE

    @classmethod
    def of(cls, spacing: float | Sequence[float], shape: Sequence[int]) -> ModelGrid:
        """The grid of a model's ``data.spacing`` and ``data.shape`` (ConfigError-free: callers validated)."""
        sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
        return cls(tuple(float(s) for s in sp), tuple(int(n) for n in shape))  # type: ignore[arg-type]

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel-to-world (RAS mm) affine."""
        sp = np.asarray(self.spacing, dtype=np.float64)
        affine = np.diag([*sp, 1.0])
        affine[:3, 3] = np.asarray(self.centre) - sp * (np.asarray(self.shape, dtype=np.float64) - 1.0) / 2.0
        return affine

    def describe(self) -> str:
        sp = self.spacing
        spacing = f"{sp[0]:g}" if sp[0] == sp[1] == sp[2] else "x".join(f"{s:g}" for s in sp)
        return f"{spacing} mm {'x'.join(map(str, self.shape))}"

    def required_box(self) -> tuple[np.ndarray, np.ndarray]:
        """World box (lo, hi) an input must cover: the brain's bounding box, clipped to the grid's voxel
        centres (a small test grid need not hold the whole brain)."""
        affine = self.affine
        lo_grid = affine[:3, 3]
        hi_grid = lo_grid + np.asarray(self.spacing) * (np.asarray(self.shape) - 1)
        brain_lo = np.asarray(MNI_BRAIN_CENTRE) - np.asarray(MNI_BRAIN_HALF_EXTENT)
        brain_hi = np.asarray(MNI_BRAIN_CENTRE) + np.asarray(MNI_BRAIN_HALF_EXTENT)
        return np.maximum(lo_grid, brain_lo), np.minimum(hi_grid, brain_hi)


def model_grid_affine(spacing: float | Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """The 4x4 affine of the model's grid (see the module docstring)."""
    return ModelGrid.of(spacing, shape).affine


# ------------------------------------------------------------------------------------------------ checks
def _fmt(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.0f}" for v in values)


def check_affine(affine: np.ndarray, source: str, codes: tuple[int, int] | None = None) -> np.ndarray:
    """``affine`` as float64 4x4, or CohortError naming ``source`` when it cannot place the volume in world
    space: no world coordinates (``codes`` = (qform_code, sform_code) both 0), non-finite, identity, zero
    voxel size or singular."""
    if codes is not None and codes[0] == 0 and codes[1] == 0:
        raise CohortError(f"{source}: the NIfTI header has no world coordinates (qform_code and sform_code are "
                          "0): cannot place it on the model's grid; write it with its scanner/MNI affine "
                          "(or run `ldae preprocess`)")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise CohortError(f"{source}: the NIfTI affine is not a finite 4x4 matrix")
    linear = affine[:3, :3]
    zooms = np.sqrt((linear**2).sum(axis=0))
    if np.any(zooms < 1e-3):
        raise CohortError(f"{source}: degenerate affine (voxel size {', '.join(f'{z:g}' for z in zooms)} mm; "
                          "pixdim 0?): cannot place it on the model's grid")
    if abs(np.linalg.det(linear)) < 1e-6 * float(np.prod(zooms)):
        raise CohortError(f"{source}: degenerate affine (singular voxel-to-world matrix): cannot place it on "
                          "the model's grid")
    if np.allclose(affine, np.eye(4)):
        raise CohortError(f"{source}: identity affine (voxel indices, not millimetres in MNI space): cannot "
                          "place it on the model's grid; run `ldae preprocess` (or write the scan with its affine)")
    return affine


def field_of_view(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """World (RAS mm) bounding box of a grid's voxels (voxel centres ± half a voxel)."""
    n = np.asarray(shape[:3], dtype=np.float64)
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in n], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    return world.min(axis=1), world.max(axis=1)


def check_coverage(affine: np.ndarray, shape: Sequence[int], grid: ModelGrid, source: str) -> None:
    """CohortError unless the input's field of view covers :meth:`ModelGrid.required_box` (within one model
    voxel)."""
    lo, hi = grid.required_box()
    tol = float(max(grid.spacing))
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1)
    vox = np.linalg.solve(affine[:3, :3], corners - affine[:3, 3:4])
    n = np.asarray(shape[:3], dtype=np.float64)[:, None]
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))[:, None]
    slack = tol / zooms
    inside = (vox >= -0.5 - slack) & (vox <= n - 0.5 + slack)
    if not inside.all():
        have_lo, have_hi = field_of_view(affine, shape)
        span = ", ".join(f"{ax} {a:.0f}..{b:.0f}" for ax, a, b in zip("RAS", have_lo, have_hi))
        need = ", ".join(f"{ax} {a:.0f}..{b:.0f}" for ax, a, b in zip("RAS", lo, hi))
        raise CohortError(
            f"{source}: field of view ({span} mm; shape {tuple(int(s) for s in shape[:3])}) does not cover the "
            f"brain on the model's grid ({need} mm, {grid.describe()}, MNI): a partial scan or one not in MNI "
            "space; use --preprocess (or `ldae preprocess`) for raw T1s"
        )


def existing_file(path: str | Path) -> Path:
    """``path`` as a Path; CohortError naming it when it is a folder or does not exist."""
    path = Path(path)
    if path.is_dir():
        raise CohortError(f"{path}: is a folder, not a NIfTI file")
    if not path.is_file():
        raise CohortError(f"{path}: file not found")
    return path


def header_geometry(path: str | Path) -> tuple[tuple[int, ...], np.ndarray, tuple[int, int] | None]:
    """``(shape, affine, (qform_code, sform_code) or None)`` from a NIfTI header (no voxel data read);
    CohortError naming the file when it is missing, a folder, or unreadable."""
    import nibabel as nib

    from ldae.errors import describe

    path = existing_file(path)
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64) if img.affine is not None else np.eye(4)
        header = img.header
        codes = pixdim = None
        if "qform_code" in header and "sform_code" in header:
            codes = (int(header["qform_code"]), int(header["sform_code"]))
            pixdim = _raw_pixdim(path, header) if codes[1] == 0 and codes[0] > 0 else None
    except Exception as exc:  # nibabel raises many types for foreign or truncated files
        raise CohortError(f"{path}: cannot read NIfTI ({describe(exc)})") from None
    if codes is not None and codes[1] == 0 and codes[0] > 0 and pixdim is not None and np.any(pixdim == 0):
        # the qform places the volume; nibabel silently replaces a zero pixdim by 1 mm, which is a guess
        raise CohortError(f"{path}: degenerate affine (voxel size pixdim {', '.join(f'{v:g}' for v in pixdim)} mm: "
                          "pixdim 0): cannot place it on the model's grid")
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:  # the wording of ldae.data.transforms.validate_volume
        raise CohortError(f"{path}: expected a 3D volume, got {len(shape)}D with shape {shape}")
    if min(shape) < 2:
        raise CohortError(f"{path}: volume has a degenerate shape {shape}")
    return shape, affine, codes


def _raw_pixdim(path: Path, header: object) -> np.ndarray | None:
    """The voxel sizes as stored in a single-file NIfTI header (nibabel's checked header has already
    replaced a zero pixdim by 1); None when the header cannot be re-read unchecked."""
    import nibabel as nib

    try:
        with nib.openers.ImageOpener(str(path)) as fh:
            raw = type(header).from_fileobj(fh, check=False)  # type: ignore[attr-defined]
        return np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    except Exception:  # noqa: BLE001 - a header pair (.hdr/.img) or another format: keep nibabel's reading
        return None


def check_geometry(path: str | Path, grid: ModelGrid | None = None) -> tuple[tuple[int, ...], np.ndarray]:
    """Header-only check that ``path`` can be resampled onto ``grid`` (default: the paper's grid, whose
    required box is the whole brain): readable 3D NIfTI, valid affine, field of view covering the brain.
    Returns ``(shape, affine)``."""
    shape, affine, codes = header_geometry(path)
    affine = check_affine(affine, str(path), codes)
    check_coverage(affine, shape, grid or ModelGrid.of(*PAPER_GRID), str(path))
    return shape, affine


# ------------------------------------------------------------------------------------------- resampling
def same_grid(affine: np.ndarray, shape: Sequence[int], grid: ModelGrid, atol: float = 1e-3) -> bool:
    """True when ``(affine, shape)`` is the model's grid itself (voxels correspond one to one)."""
    return tuple(int(s) for s in shape[:3]) == grid.shape and bool(np.allclose(affine, grid.affine, atol=atol))


def resample_to_grid(data: np.ndarray, affine: np.ndarray, grid: ModelGrid) -> np.ndarray:
    """``data`` (3D, voxel-to-world ``affine``) on the model's grid: float32 ``grid.shape``.

    Identity when the input already is on the grid; otherwise Gaussian anti-aliasing along axes where the
    input is finer than the grid, then trilinear sampling at ``A_in^-1 A_grid j`` (zeros outside)."""
    import torch
    import torch.nn.functional as F

    data = np.asarray(data)
    if same_grid(affine, data.shape, grid):
        return np.array(data, dtype=np.float32)
    work = np.asarray(data, dtype=np.float32)
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    zooms = np.sqrt((linear**2).sum(axis=0))
    directions = linear / zooms  # unit world direction of each input axis
    target = np.sqrt((directions**2 * np.asarray(grid.spacing)[:, None] ** 2).sum(axis=0))  # grid step along it
    factor = target / zooms
    if np.any(factor > 1.0 + 1e-3):
        from scipy.ndimage import gaussian_filter

        sigma = np.maximum((factor - 1.0) / 2.0, 0.0)
        work = gaussian_filter(work, sigma=sigma, mode="nearest").astype(np.float32)
    n_in = np.asarray(work.shape, dtype=np.float64)
    n_out = np.asarray(grid.shape, dtype=np.float64)
    m = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ grid.affine  # output voxel -> input voxel
    to_index = np.diag([*((n_out - 1) / 2), 1.0])
    to_index[:3, 3] = (n_out - 1) / 2  # normalised output coordinate u -> output voxel (align_corners)
    to_norm = np.diag([*(2 / (n_in - 1)), 1.0])
    to_norm[:3, 3] = -1.0  # input voxel -> normalised input coordinate
    theta = to_norm @ m @ to_index
    rev = np.eye(4)[[2, 1, 0, 3]]  # grid_sample orders coordinates (x, y, z) = (last, middle, first) axis
    theta = rev @ theta @ rev
    with torch.no_grad():
        src = torch.from_numpy(np.ascontiguousarray(work))[None, None]
        sample_grid = F.affine_grid(torch.as_tensor(theta[None, :3], dtype=torch.float32),
                                    [1, 1, *grid.shape], align_corners=True)
        out = F.grid_sample(src, sample_grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, 0].numpy().astype(np.float32, copy=False)
