"""Anatomy of the synthetic cohort: template arrays, atrophy fields, subject warps, composed deformations.

Geometry is in MNI millimetres (RAS). An output point ``x`` (subject space) shows the template at
``psi(x) = A(S(x))``: ``S`` is the subject map (head scale and a smooth random diffeomorphism, fixed for
a subject) and ``A`` the session's atrophy flow in template space. These are *pull-back* maps: a flow that
moves sampling points toward a structure enlarges that structure in the output image.

Atrophy fields are boundary-shift fields: ``F = grad(G_sigma * 1_R) / max|.|`` points into structure ``R``
with unit peak speed, so the flow of ``a * F`` for unit time grows ``R`` (``a > 0``) or shrinks it
(``a < 0``) by moving its boundary about ``a`` mm. Flows of smooth velocities are diffeomorphisms; the
composed map is still checked numerically (finite-difference Jacobian determinant on the field grid).
``psi`` is computed on a coarse field grid and interpolated trilinearly, so each output voxel is
resampled once, from the 1 mm template.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ldae.data.templates import CEREBRA_LABELS, template_files
from ldae.errors import ConfigError, LDAEError

STRUCTURE_LABELS: dict[str, tuple[int, ...]] = {
    "hippocampus": CEREBRA_LABELS["hippocampus"],
    "ventricles": CEREBRA_LABELS["lateral_ventricle"] + CEREBRA_LABELS["inferior_lateral_ventricle"],
}


@dataclass(frozen=True)
class Grid:
    """A regular isotropic RAS grid: voxel ``i`` lies at ``origin + spacing * i`` (mm)."""

    origin: tuple[float, float, float]
    spacing: float
    shape: tuple[int, int, int]

    @classmethod
    def centred(cls, centre: Sequence[float], shape: Sequence[int], spacing: float) -> Grid:
        """The grid of ``shape`` voxels whose centre lies at ``centre``."""
        shape = tuple(int(s) for s in shape)
        origin = np.asarray(centre, float) - 0.5 * float(spacing) * (np.asarray(shape) - 1)
        return cls(tuple(float(o) for o in origin), float(spacing), shape)  # type: ignore[arg-type]

    @classmethod
    def covering(cls, lo: Sequence[float], hi: Sequence[float], spacing: float) -> Grid:
        """The smallest grid, centred on the box, whose voxel centres span ``[lo, hi]``."""
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        shape = np.ceil((hi - lo) / spacing).astype(int) + 1
        return cls.centred((lo + hi) / 2, shape, spacing)

    @property
    def affine(self) -> np.ndarray:
        """The 4x4 voxel-to-mm affine."""
        a = np.diag([self.spacing] * 3 + [1.0])
        a[:3, 3] = self.origin
        return a

    def axes(self) -> list[np.ndarray]:
        """Millimetre coordinates along each axis."""
        return [o + self.spacing * np.arange(n) for o, n in zip(self.origin, self.shape)]

    def points(self) -> np.ndarray:
        """All voxel centres, ``(3, *shape)`` float32 mm."""
        return np.stack(np.meshgrid(*self.axes(), indexing="ij")).astype(np.float32)

    def to_index(self, pts: np.ndarray) -> np.ndarray:
        """Continuous voxel indices of points ``(3, ...)`` in mm."""
        o = np.asarray(self.origin, np.float32).reshape((3,) + (1,) * (pts.ndim - 1))
        return (pts - o) / np.float32(self.spacing)


def sample(
    volume: np.ndarray, grid: Grid, pts: np.ndarray, order: int = 1, mode: str = "constant"
) -> np.ndarray:
    """Interpolate ``volume`` (on ``grid``) at points ``(3, ...)`` mm; zero outside unless ``mode``."""
    return ndimage.map_coordinates(volume, grid.to_index(pts), order=order, mode=mode, prefilter=False)


def sample_field(field: np.ndarray, grid: Grid, pts: np.ndarray, mode: str = "nearest") -> np.ndarray:
    """Trilinear interpolation of a vector field ``(3, *grid.shape)`` at points ``(3, ...)``."""
    idx = grid.to_index(pts)
    return np.stack([ndimage.map_coordinates(c, idx, order=1, mode=mode, prefilter=False) for c in field])


# --------------------------------------------------------------------------------------------- template
@dataclass(frozen=True, eq=False)  # hashed by identity (it holds arrays), for the per-process caches
class Template:
    """The 1 mm ICBM 2009c template cropped to the brain: T1 (1 at its 99.9th percentile), and fractions."""

    grid: Grid
    intensity: np.ndarray
    mask: np.ndarray
    structures: dict[str, np.ndarray]  # name -> label fraction (float32)
    centre: np.ndarray                 # brain box centre (mm)
    half_extent: np.ndarray            # brain box half size (mm)


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, float)
    except Exception as exc:  # noqa: BLE001 - any unreadable template is a setup problem
        raise LDAEError(
            f"cannot read brain template {path} ({exc}); reinstall it (see ldae.data.templates)"
        ) from None


def load_template() -> Template:
    """The template for the current ``template_files()`` (cached per process and location)."""
    files = template_files()
    return _load_template(str(files.t1_brain), str(files.brain_mask), str(files.cerebra))


@functools.lru_cache(maxsize=2)
def _load_template(t1_path: str, mask_path: str, labels_path: str) -> Template:
    t1, affine = _load(Path(t1_path))
    mask, mask_affine = _load(Path(mask_path))
    labels, label_affine = _load(Path(labels_path))
    spacing = float(affine[0, 0])
    if (
        not np.allclose(affine[:3, :3], np.eye(3) * spacing)
        or spacing <= 0
        or not (np.allclose(affine, mask_affine) and np.allclose(affine, label_affine))
        or not (t1.shape == mask.shape == labels.shape)
    ):
        raise LDAEError(f"brain templates {t1_path}, {mask_path}, {labels_path}: expected one shared "
                        "isotropic RAS grid (diagonal affine)")
    brain = mask > 0.5
    idx = np.argwhere(brain)
    lo_i, hi_i = idx.min(0), idx.max(0)
    pad = int(np.ceil(6.0 / spacing))
    lo_c = np.maximum(lo_i - pad, 0)
    hi_c = np.minimum(hi_i + pad + 1, np.array(t1.shape))
    crop = tuple(slice(a, b) for a, b in zip(lo_c, hi_c))
    origin = affine[:3, 3] + spacing * lo_c
    grid = Grid(tuple(float(o) for o in origin), spacing, tuple(int(b - a) for a, b in zip(lo_c, hi_c)))
    t1 = np.clip(t1[crop], 0, None)
    mask_c = np.clip(mask[crop], 0.0, 1.0)
    scale = float(np.percentile(t1[mask_c > 0.5], 99.9))
    lab = np.rint(labels[crop]).astype(np.int32)
    structures = {
        name: np.isin(lab, ids).astype(np.float32) for name, ids in STRUCTURE_LABELS.items()
    }
    lo_mm = affine[:3, 3] + spacing * lo_i
    hi_mm = affine[:3, 3] + spacing * hi_i
    return Template(
        grid=grid,
        intensity=(t1 / scale).astype(np.float32),
        mask=mask_c.astype(np.float32),
        structures=structures,
        centre=(lo_mm + hi_mm) / 2,
        half_extent=(hi_mm - lo_mm) / 2,
    )


def template_intensity(template: Template, spacing: float) -> np.ndarray:
    """Template T1 low-pass filtered for sampling at ``spacing`` mm (anti-aliasing; cached)."""
    return _smoothed(template, round(float(spacing), 4))


@functools.lru_cache(maxsize=2)
def _smoothed(template: Template, spacing: float) -> np.ndarray:
    t = template.grid.spacing
    sigma = 0.5 * np.sqrt(max(spacing**2 - t**2, 0.0)) / t  # voxels of the template grid
    if sigma < 0.05:
        return template.intensity
    return ndimage.gaussian_filter(template.intensity, sigma, mode="constant").astype(np.float32)


def subject_box(template: Template, cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Subject-space box (mm) holding the brain of any allowed head scale, plus the configured margin."""
    h_max = max(float(h) for h in cfg["anatomy"]["head_scale_range"])
    half = template.half_extent * h_max + float(cfg["grid"]["margin"])
    return template.centre - half, template.centre + half


def truth_grid(template: Template, cfg: Mapping[str, Any]) -> Grid:
    """The fixed grid on which ground-truth volumes are measured: it covers the subject box and its
    points lie at ``centre + spacing * (k + 1/2)``, so even-shaped output grids of that spacing centred
    on the brain (the default) share its points. It never depends on the output grid."""
    lo, hi = subject_box(template, cfg)
    spacing = float(cfg["grid"]["truth_spacing"])
    half = np.ceil((hi - lo) / 2 / spacing).astype(int)
    return Grid.centred(template.centre, 2 * half, spacing)


# ------------------------------------------------------------------------------------- atrophy fields
@dataclass(frozen=True, eq=False)
class AtrophyFields:
    """Unit boundary-shift fields in template space, their measured volume responses, and distance maps
    that bound where a flowed point can land."""

    grid: Grid
    fields: dict[str, np.ndarray]     # name -> (3, *grid.shape) float32, peak speed 1, pointing inward
    support: np.ndarray               # bool, where any field is non-negligible (dilated by one voxel)
    amplitude_knots: np.ndarray       # amplitudes (mm) at which the response was measured
    response: dict[str, np.ndarray]   # name -> log(volume ratio) of the template at each knot
    brain_distance: np.ndarray        # mm from each voxel to the brain mask (0 inside)
    brain_depth: np.ndarray           # mm from each voxel to where the mask fraction drops below 1
    structure_distance: np.ndarray    # mm to the nearest measured structure (hippocampus, ventricles)
    knee: float                       # fraction of the reachable response followed exactly

    def velocity(self, amplitudes: Mapping[str, float]) -> np.ndarray:
        """``sum_k a_k F_k`` as one ``(3, *shape)`` float32 field."""
        v = np.zeros_like(next(iter(self.fields.values())))
        for name, a in amplitudes.items():
            if a:
                v += np.float32(a) * self.fields[name]
        return v

    def amplitudes_for(self, log_ratio: Mapping[str, float]) -> dict[str, float]:
        """Amplitude (mm) of each field whose flow changes the template's structure volume by the target
        ``log_ratio``: the inverse of the measured monotone response. Targets beyond ``knee`` times the
        reachable range are compressed smoothly (tanh) toward it, so they stay strictly monotone."""
        out = {}
        for k in self.fields:
            r = self.response[k]
            y = float(log_ratio[k])
            limit = float(r[-1]) if y > 0 else float(r[0])
            knee = self.knee * limit
            if abs(y) > abs(knee):
                y = knee + (limit - knee) * float(np.tanh((y - knee) / (limit - knee)))
            out[k] = float(np.interp(y, r, self.amplitude_knots))
        return out

    def near(self, distance: np.ndarray, pts: np.ndarray) -> np.ndarray:
        """A distance map of this grid interpolated at template-space points (far outside: large)."""
        return sample(distance, self.grid, pts, order=0, mode="nearest")


def atrophy_fields(template: Template, cfg: Mapping[str, Any]) -> AtrophyFields:
    """The boundary-shift fields of hippocampus, ventricles and brain (cached per process and config)."""
    anatomy = cfg["anatomy"]
    key = (
        float(anatomy["atrophy_grid"]),
        float(anatomy["max_shift"]),
        float(anatomy["flow_step"]),
        tuple(float(anatomy[k]["smooth"]) for k in ("brain", "hippocampus", "ventricles")),
        float(anatomy["response_knee"]),
    )
    return _atrophy_fields(template, key)


@functools.lru_cache(maxsize=2)
def _atrophy_fields(template: Template, key: tuple) -> AtrophyFields:
    spacing, max_shift, step, smooth, knee = key
    lo = np.asarray(template.grid.origin)
    hi = lo + template.grid.spacing * (np.asarray(template.grid.shape) - 1)
    grid = Grid.covering(lo, hi, spacing)
    pts = grid.points()
    t = template.grid.spacing
    indicators = {"brain": template.mask, **template.structures}
    fields, fractions, speed = {}, {}, []
    for (name, frac), sigma in zip(indicators.items(), smooth):
        smoothed = ndimage.gaussian_filter(frac, sigma / t, mode="constant")
        grad = np.stack(np.gradient(sample(smoothed, template.grid, pts), spacing)).astype(np.float32)
        norm = np.sqrt((grad**2).sum(0))
        fields[name] = grad / np.float32(norm.max())
        speed.append(norm / norm.max())
        fractions[name] = sample(frac, template.grid, pts)
    support = ndimage.binary_dilation(np.max(speed, axis=0) > 1e-3)
    knots = np.linspace(-max_shift, max_shift, 2 * int(np.ceil(max_shift)) + 1)
    response = {
        name: _response(frac, fields[name], grid, knots, max_shift, step) for name, frac in fractions.items()
    }
    structures = np.max([fractions[k] for k in template.structures], axis=0) > 0

    def distance(region: np.ndarray) -> np.ndarray:
        return (ndimage.distance_transform_edt(~region) * spacing).astype(np.float32)

    return AtrophyFields(
        grid, fields, support, knots, response,
        brain_distance=distance(fractions["brain"] > 0),
        brain_depth=distance(fractions["brain"] < 0.999),
        structure_distance=distance(structures),
        knee=knee,
    )


def _response(
    frac: np.ndarray, field: np.ndarray, grid: Grid, knots: np.ndarray, reach: float, step: float
) -> np.ndarray:
    """log(V(a) / V(0)) of a structure under the pull-back flow of ``a * field``, for each knot ``a``.

    Only points within ``reach`` mm of the structure's boundary can change side, so the core is counted
    once and the band is flowed. Made non-decreasing (the response is monotone up to round-off).
    """
    inside = frac > 0.5
    n = int(np.ceil(reach / grid.spacing)) + 2
    core = ndimage.binary_erosion(inside, iterations=n)
    band = ndimage.binary_dilation(inside, iterations=n) & ~core
    x = (np.stack(np.nonzero(band)).astype(np.float32) * np.float32(grid.spacing)
         + np.asarray(grid.origin, np.float32)[:, None])
    core_sum = float(frac[core].sum(dtype=np.float64))
    volumes = []
    for a in knots:
        p = flow(x, field * np.float32(a), grid, step) if a else x
        volumes.append(core_sum + float(sample(frac, grid, p).sum(dtype=np.float64)))
    curve = np.log(np.asarray(volumes) / volumes[len(knots) // 2])
    return np.maximum.accumulate(curve)


def flow(pts: np.ndarray, velocity: np.ndarray, grid: Grid, max_step: float) -> np.ndarray:
    """Positions after the unit-time flow of a stationary ``velocity`` (midpoint rule).

    The number of steps keeps every step's displacement below ``max_step`` mm: with velocities smooth on
    a scale of a few mm each step is then a small perturbation of the identity, hence invertible, and so
    is their composition.
    """
    speed = float(np.sqrt((velocity.astype(np.float64) ** 2).sum(0)).max()) if velocity.size else 0.0
    steps = max(1, int(np.ceil(speed / max_step)))
    h = np.float32(1.0 / steps)
    p = pts.astype(np.float32, copy=True)
    for _ in range(steps):
        mid = p + 0.5 * h * sample_field(velocity, grid, p, mode="constant")
        p += h * sample_field(velocity, grid, mid, mode="constant")
    return p


# ---------------------------------------------------------------------------------- random fields
def random_field(rng: np.random.Generator, grid: Grid, smooth_mm: float, components: int) -> np.ndarray:
    """Gaussian random field ``(components, *shape)``, correlation length ``smooth_mm``, unit RMS each."""
    out = np.empty((components, *grid.shape), np.float32)
    for c in range(components):
        f = ndimage.gaussian_filter(rng.standard_normal(grid.shape, dtype=np.float32), smooth_mm / grid.spacing)
        out[c] = f / np.float32(np.sqrt((f.astype(np.float64) ** 2).mean()))
    return out


def exp_velocity(velocity: np.ndarray, grid: Grid, squarings: int) -> np.ndarray:
    """Displacement (mm) of the group exponential of a stationary velocity (scaling and squaring)."""
    disp = velocity / np.float32(2**squarings)
    pts = grid.points()
    for _ in range(squarings):
        disp = disp + sample_field(disp, grid, pts + disp, mode="nearest")
    return disp


def jacobian_determinant(pos: np.ndarray, spacing: float) -> np.ndarray:
    """det(D pos) by central finite differences of a map ``(3, *shape)`` sampled on a grid."""
    j = [np.gradient(pos[i].astype(np.float64), spacing) for i in range(3)]  # j[i][k] = d pos_i / d x_k
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


def _points_of(sel: np.ndarray, grid: Grid) -> np.ndarray:
    """Millimetre positions ``(3, N)`` float32 of the True voxels of ``sel`` on ``grid``."""
    idx = np.stack(np.nonzero(sel)).astype(np.float32)
    return idx * np.float32(grid.spacing) + np.asarray(grid.origin, np.float32)[:, None]


def select(field_grid: Grid, keep: np.ndarray, target: Grid) -> np.ndarray:
    """Boolean mask on ``target``: voxels whose nearest field-grid voxel is in ``keep``."""
    idx = [
        np.clip(np.rint((ax - o) / field_grid.spacing).astype(int), 0, n - 1)
        for ax, o, n in zip(target.axes(), field_grid.origin, field_grid.shape)
    ]
    return keep[np.ix_(*idx)]


# ------------------------------------------------------------------------------------ one subject
@dataclass
class Session:
    """The composed deformation of one visit and what was measured from it."""

    psi: np.ndarray                 # (3, *field_grid.shape) template mm
    min_jacobian: float
    volumes: dict[str, float]       # ml
    band_psi: np.ndarray            # psi at the truth-grid brain points outside the sure-brain core
    band_mask: np.ndarray           # warped brain-mask fraction there


class SubjectAnatomy:
    """One subject's geometry: ``S`` on the field grid, the truth-grid points that can hold brain or a
    measured structure, and per-session composition with the atrophy flow.

    ``S(x) = c + (x + u(x) - c) / head_scale`` with ``u = exp(v)`` a smooth random diffeomorphism whose
    amplitude is halved until ``det(DS) * head_scale**3 >= anatomy.warp.min_jacobian`` on the field grid.
    ``reach`` (mm) bounds how far any session's atrophy flow moves a point (sum of |amplitudes|): points
    whose ``S(x)`` lies farther than that from the brain can never show brain, and points deeper than that
    inside it always show brain (they are counted, not sampled).
    """

    def __init__(
        self,
        template: Template,
        fields: AtrophyFields,
        cfg: Mapping[str, Any],
        head_scale: float,
        warp_rng: np.random.Generator,
        reach: float,
    ) -> None:
        self.template, self.fields = template, fields
        anatomy, warp = cfg["anatomy"], cfg["anatomy"]["warp"]
        self.flow_step = float(anatomy["flow_step"])
        self.min_jacobian = float(anatomy["min_jacobian"])
        lo, hi = subject_box(template, cfg)
        self.field_grid = fg = Grid.covering(lo, hi, float(cfg["grid"]["field_spacing"]))
        self.warp_grid = Grid.covering(lo, hi, float(warp["grid"]))
        self.truth = truth_grid(template, cfg)
        unit = random_field(warp_rng, self.warp_grid, float(warp["smooth"]), 3)
        x = fg.points()
        c = np.asarray(template.centre, np.float32).reshape(3, 1, 1, 1)
        self.warp_scale = 1.0
        for _ in range(10):
            v = unit * np.float32(float(warp["amplitude"]) * self.warp_scale)
            u = sample_field(exp_velocity(v, self.warp_grid, int(warp["squarings"])), self.warp_grid, x)
            self.positions = c + (x + u - c) / np.float32(head_scale)
            det = float(jacobian_determinant(self.positions, fg.spacing).min()) * head_scale**3
            if det >= float(warp["min_jacobian"]):
                break
            self.warp_scale *= 0.5
        self.warp_min_jacobian = det
        # margin: trilinear interpolation of psi inside a field cell, and the distance maps' resolution
        margin = reach + 2.0 * fg.spacing + 2.0 * fields.grid.spacing
        near = functools.partial(fields.near, pts=self.positions)
        self.brain_keep = ndimage.binary_dilation(near(fields.brain_distance) <= margin)
        core = ndimage.binary_erosion(near(fields.brain_depth) > margin) & self.brain_keep
        self.core_keep = core  # field-grid voxels that show brain (mask fraction >= 0.999) in every session
        roi_keep = ndimage.binary_dilation(near(fields.structure_distance) <= margin)
        brain_sel = select(fg, self.brain_keep, self.truth)
        core_sel = select(fg, core, self.truth) & brain_sel
        self.n_core = int(core_sel.sum())
        self.core_index = np.stack(np.nonzero(core_sel))
        self.band_index = np.stack(np.nonzero(brain_sel & ~core_sel))
        self.roi_points = _points_of(select(fg, roi_keep, self.truth), self.truth)

    def _truth_points(self, index: np.ndarray) -> np.ndarray:
        return index.astype(np.float32) * np.float32(self.truth.spacing) + np.asarray(
            self.truth.origin, np.float32
        )[:, None]

    def session(self, amplitudes: Mapping[str, float], where: str = "a session") -> Session:
        """Compose ``psi = A(S(x))``, check det(J) > anatomy.min_jacobian, and measure the volumes."""
        psi = self.positions.copy()
        active = sample(self.fields.support.astype(np.float32), self.fields.grid, psi, order=0) > 0
        if active.any() and any(amplitudes.values()):
            velocity = self.fields.velocity(amplitudes)
            psi[:, active] = flow(psi[:, active], velocity, self.fields.grid, self.flow_step)
        det = float(jacobian_determinant(psi, self.field_grid.spacing).min())
        if not det > self.min_jacobian:
            raise ConfigError(
                f"synth: the composed deformation of {where} has det(J) = {det:.3f} <= anatomy.min_jacobian "
                f"{self.min_jacobian}; lower anatomy.max_shift or the effect sizes"
            )
        t = self.template
        voxel_ml = self.truth.spacing**3 / 1000.0
        band_psi = sample_field(psi, self.field_grid, self._truth_points(self.band_index))
        band_mask = sample(t.mask, t.grid, band_psi)
        roi_psi = sample_field(psi, self.field_grid, self.roi_points)
        ml = {k: float(sample(f, t.grid, roi_psi).sum(dtype=np.float64)) * voxel_ml for k, f in t.structures.items()}
        brain_ml = (self.n_core + float(band_mask.sum(dtype=np.float64))) * voxel_ml
        volumes = {
            "hippocampus_volume_ml": ml["hippocampus"],
            "ventricle_volume_ml": ml["ventricles"],
            "brain_volume_ml": brain_ml - ml["ventricles"],
        }
        return Session(psi, det, volumes, band_psi, band_mask)

    def output_samples(
        self, session: Session, out: Grid, threshold: float,
        motion: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[tuple[np.ndarray, ...], np.ndarray, np.ndarray, np.ndarray]:
        """Voxels of ``out`` whose warped brain-mask fraction is >= ``threshold``: their indices,
        output-grid points (mm), ``psi`` and mask fraction (reusing the truth-grid samples when ``out``
        shares the truth grid's points, as the default output grid does, and there is no motion).

        ``motion = (R, b)``: the scan shows the subject rigidly moved, output point ``x`` sees the subject
        at ``R x + b`` (residual misregistration); the returned points stay the output grid's (scanner
        frame). Candidates (sampled) and sure brain (mask fraction 1, not sampled) are field-grid regions
        grown and shrunk by the motion's largest displacement over the grid (a rigid map's displacement
        is convex: its largest value is at a corner). On grids finer than the field grid they come from
        this session's warped mask on the field grid (``> 0`` dilated, ``>= 0.999`` eroded by two cells
        more: ``psi`` is smooth on the scale of a cell, so only brain-mask specks smaller than a cell
        could be missed); on coarser grids (few voxels) from the subject's all-session bounds.
        """
        offset = (np.asarray(out.origin) - np.asarray(self.truth.origin)) / self.truth.spacing
        shared = np.isclose(out.spacing, self.truth.spacing) and np.allclose(offset, np.rint(offset), atol=1e-4)
        if shared and motion is None:
            keep = session.band_mask >= threshold
            index = np.concatenate([self.core_index, self.band_index[:, keep]], axis=1)
            pts = self._truth_points(index)
            core_psi = sample_field(session.psi, self.field_grid, pts[:, : self.core_index.shape[1]])
            psi = np.concatenate([core_psi, session.band_psi[:, keep]], axis=1)
            mask = np.concatenate([np.ones(self.core_index.shape[1], np.float32), session.band_mask[keep]])
            idx = index - np.rint(offset).astype(int)[:, None]
            ok = np.all((idx >= 0) & (idx < np.asarray(out.shape)[:, None]), axis=0)
            return tuple(idx[:, ok]), pts[:, ok], psi[:, ok], mask[ok]
        fg = self.field_grid
        r = b = None
        n = 0
        if motion is not None:
            r, b = (np.asarray(m, np.float64) for m in motion)
            lo, hi = np.asarray(out.origin), np.asarray(out.origin) + out.spacing * (np.asarray(out.shape) - 1)
            corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1)
            reach = float(np.sqrt((((r - np.eye(3)) @ corners + b[:, None]) ** 2).sum(0)).max())
            n = int(np.ceil(reach / fg.spacing))
        if out.spacing < fg.spacing:
            mask_fg = sample(self.template.mask, self.template.grid, session.psi)
            keep_fg, core_fg, n = mask_fg > 0, mask_fg >= 0.999, n + 2
        else:
            keep_fg, core_fg = self.brain_keep, self.core_keep
        if n:
            keep_fg = ndimage.binary_dilation(keep_fg, iterations=n)
            core_fg = ndimage.binary_erosion(core_fg, iterations=n)
        sel = select(fg, keep_fg, out)
        inner = select(fg, core_fg, out)[sel]
        pts = _points_of(sel, out)
        seen = pts if r is None else (r.astype(np.float32) @ pts + b.astype(np.float32)[:, None])
        psi = sample_field(session.psi, fg, seen)
        mask = np.ones(pts.shape[1], np.float32)  # sure brain: mask fraction >= 0.999 (the fast path's 1)
        mask[~inner] = sample(self.template.mask, self.template.grid, psi[:, ~inner])
        keep = mask >= threshold
        idx = np.stack(np.nonzero(sel))[:, keep]
        return tuple(idx), pts[:, keep], psi[:, keep], mask[keep]
