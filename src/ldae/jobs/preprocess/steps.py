"""The ANTs steps of raw-T1 preprocessing, in order: read -> N4 bias-field correction -> brain extraction
(template head registered to the scan, its brain mask warped back and refined) -> affine registration of
the skull-stripped scan to the skull-stripped template -> [0, 1] scaling inside the brain mask; and the
target grid they resample onto (:func:`mni_grid`, the model's space)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ldae.data import ants as ants_helpers
from ldae.data.ants import ants_affine, to_ants
from ldae.errors import LDAEError

PURPOSE = "raw-T1 preprocessing"
#: the one-line message when ANTsPy is missing (:func:`require_ants`)
INSTALL_HINT = f"{PURPOSE} needs ANTsPy: {ants_helpers.INSTALL_HINT}"


def require_ants() -> Any:
    """Import ANTsPy, or raise LDAEError saying how to install it (:data:`INSTALL_HINT`)."""
    return ants_helpers.require_ants(PURPOSE)


# ----------------------------------------------------------------------------------------------------
# target grid and templates


@functools.lru_cache(maxsize=1)
def template_brain_centre() -> tuple[float, float, float]:
    """World (RAS, mm) centre of the bounding box of the bundled ICBM 2009c brain mask."""
    import nibabel as nib

    from ldae.data.templates import template_files

    img = nib.load(str(template_files().brain_mask))
    idx = np.argwhere(np.asarray(img.dataobj) > 0.5)
    centre_vox = (idx.min(0) + idx.max(0)) / 2.0
    centre = img.affine[:3, :3] @ centre_vox + img.affine[:3, 3]
    return tuple(float(c) for c in centre)  # type: ignore[return-value]


def mni_grid(spacing: float = 1.5, shape: Sequence[int] = (128, 160, 128)) -> np.ndarray:
    """The 4x4 voxel-to-world affine of the model-ready grid: RAS axes, isotropic ``spacing`` mm, voxel
    centre ``(shape - 1) / 2`` on the template brain's bounding-box centre (MNI ICBM 2009c).

    The single definition of the target space: preprocessed scans and the synthetic cohort share it, so
    the model-ready transform chain (RAS, spacing, centre crop/pad) leaves them unchanged.
    """
    shape_arr = np.asarray(shape, dtype=np.float64)
    affine = np.diag([float(spacing)] * 3 + [1.0])
    affine[:3, 3] = np.asarray(template_brain_centre()) - float(spacing) * (shape_arr - 1) / 2.0
    return affine

def load_scan(path: str | Path):
    """Read and validate a raw scan (3D, finite, not constant) as an ANTs image; CohortError otherwise."""
    from ldae.data.transforms import read_volume

    data, affine = read_volume(path)
    return to_ants(data, affine)


@dataclass
class Templates:
    """The bundled template as ANTs images (1 mm) plus cached resampled copies and the target grid."""

    head: Any
    brain: Any
    mask: Any
    grid: Any
    brain_on_grid: np.ndarray
    mask_on_grid: np.ndarray
    _cache: dict = field(default_factory=dict, repr=False)

    def resampled(self, name: str, spacing: float):
        """``head``/``brain``/``mask`` resampled (linear) to isotropic ``spacing`` mm, cached."""
        key = (name, float(spacing))
        if key not in self._cache:
            ants = require_ants()
            self._cache[key] = ants.resample_image(getattr(self, name), (float(spacing),) * 3, False, 0)
        return self._cache[key]


@functools.lru_cache(maxsize=2)
def load_templates(spacing: float, shape: tuple[int, int, int]) -> Templates:
    """Load the template head/brain/mask and put the brain and mask on the target grid (cached)."""
    from ldae.data.templates import template_files
    from ldae.data.transforms import read_volume

    files = template_files()
    head, brain, mask = (to_ants(*read_volume(p)) for p in (files.t1, files.t1_brain, files.brain_mask))
    grid = to_ants(np.zeros(shape, dtype=np.float32), mni_grid(spacing, shape))
    ants = require_ants()
    brain_on_grid = ants.resample_image_to_target(brain, grid, interp_type="linear").numpy()
    mask_on_grid = ants.resample_image_to_target(mask, grid, interp_type="linear").numpy() >= 0.5
    return Templates(head, brain, mask, grid, brain_on_grid, mask_on_grid)



def _isotropic(image, spacing: float):
    """``image`` resampled (linear) to isotropic ``spacing`` mm; unchanged when already that coarse."""
    ants = require_ants()
    if min(image.spacing) >= spacing * 0.99 and max(image.spacing) <= spacing * 1.01:
        return image
    return ants.resample_image(image, (float(spacing),) * 3, False, 0)


def bias_correct(image, cfg: dict):
    """N4 bias-field correction of ``image`` on its native grid.

    The field is fitted on a copy resampled to ``n4.spacing`` mm inside a rough head mask (N4's cost
    grows with the voxel count, and the field is smooth), then its log is interpolated linearly back
    onto the native grid (edge values extended) and divided out.
    """
    ants = require_ants()
    from scipy import ndimage

    n4 = cfg["n4"]
    if not n4["enabled"]:
        return image
    low = ants.resample_image(image, (float(n4["spacing"]),) * 3, False, 0)
    field_low = ants.n4_bias_field_correction(
        low,
        mask=ants.get_mask(low, cleanup=2),
        shrink_factor=1,
        convergence={"iters": list(n4["iterations"]), "tol": float(n4["tolerance"])},
        spline_param=float(n4["spline_distance"]),
        return_bias_field=True,
    )
    to_low = np.linalg.inv(ants_affine(low)) @ ants_affine(image)  # native voxel -> low-res voxel
    log_field = ndimage.affine_transform(
        np.log(np.maximum(field_low.numpy(), 1e-6)), to_low[:3, :3], to_low[:3, 3],
        output_shape=image.shape, order=1, mode="nearest",
    )
    corrected = image.numpy() / np.exp(log_field).astype(np.float32)
    return image.new_image_like(corrected.astype(np.float32))


def _affine_registration(fixed, moving, section: dict, prefix: Path, initial: list[str] | None = None) -> dict:
    """ANTs affine registration (Mattes MI) with the multi-resolution schedule of a config section."""
    ants = require_ants()
    return ants.registration(
        fixed=fixed,
        moving=moving,
        type_of_transform="Affine",
        initial_transform=initial,
        outprefix=str(prefix),
        aff_metric="mattes",
        aff_sampling=int(section["bins"]),
        aff_random_sampling_rate=float(section["sampling_rate"]),
        aff_iterations=tuple(section["iterations"]),
        aff_shrink_factors=tuple(section["shrink_factors"]),
        aff_smoothing_sigmas=tuple(section["smoothing_sigmas"]),
    )


def refine_mask(prob: np.ndarray, threshold: float, closing_vox: int) -> np.ndarray:
    """Binary brain mask from a warped (soft) template mask: threshold, closing with a ball of
    ``closing_vox`` voxels, hole filling, largest connected component."""
    from scipy import ndimage

    mask = prob >= threshold
    if closing_vox > 0:
        r = np.arange(-closing_vox, closing_vox + 1)
        ball = (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= closing_vox**2
        padded = np.pad(mask, closing_vox + 1)
        closed = ndimage.binary_closing(padded, structure=ball)
        mask = closed[(slice(closing_vox + 1, -(closing_vox + 1)),) * 3]
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    return mask


#: fraction of the 99th intensity percentile above which a voxel is foreground (not air, not zero)
FOREGROUND_FRACTION = 0.05


def foreground_mask(data: np.ndarray) -> np.ndarray:
    """The object in a scan: voxels above :data:`FOREGROUND_FRACTION` x the 99th percentile of the
    positive voxels, largest connected component, holes filled (the head, or the brain of a
    skull-stripped scan)."""
    from scipy import ndimage

    positive = data[data > 0]
    if positive.size == 0:
        return np.zeros(data.shape, dtype=bool)
    mask = data > FOREGROUND_FRACTION * float(np.percentile(positive, 99))
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


def foreground_ml(image, spacing: float) -> float:
    """Volume (ml) of :func:`foreground_mask` of ``image`` resampled to ``spacing`` mm."""
    work = _isotropic(image, spacing)
    return float(foreground_mask(work.numpy()).sum()) * float(np.prod(work.spacing)) / 1000.0


def is_skull_stripped(image, cfg: dict) -> tuple[bool, float]:
    """Whether ``image`` holds a brain only (already skull-stripped), and its foreground volume in ml.

    ``brain_extraction.skull_stripped`` decides (true / false), or ``auto``: skull-stripped when the
    foreground is at most ``stripped_max_ml``. A brain with its CSF is 1.0-2.0 l (the ICBM 2009c brain
    mask 1.95 l, Colin27's 1.8 l); a head with its skull is 3 l and more (Colin27 4.1 l, the published
    LDAE sample 3.4 l, cropped above the neck).
    """
    be = cfg["brain_extraction"]
    volume = foreground_ml(image, float(be["mask_spacing"]))
    mode = be["skull_stripped"]
    stripped = volume <= float(be["stripped_max_ml"]) if mode == "auto" else bool(mode)
    return stripped, round(volume, 1)


def extract_brain(image, templates: Templates, cfg: dict, workdir: Path, stripped: bool = False) -> tuple[Any, str]:
    """Brain mask of ``image`` on its native grid, and the template->scan affine (transform file).

    A scan with its skull: the template head is registered to the scan (affine at
    ``brain_extraction.spacing``, then an optional coarse SyN); the 1 mm template brain mask is warped
    onto the scan resampled to ``mask_spacing``, refined there (:func:`refine_mask`), and interpolated
    onto the native grid. A skull-stripped scan (``stripped``, see :func:`is_skull_stripped`): the
    template *brain* is registered to it (registering a head to a brain scales the head down onto the
    brain), and its own brain (:func:`foreground_mask`) is kept as the mask.
    """
    ants = require_ants()
    be = cfg["brain_extraction"]
    spacing = float(be["spacing"])
    reference = "brain" if stripped else "head"
    head = _affine_registration(
        templates.resampled(reference, spacing), _isotropic(image, spacing), be, workdir / "head_"
    )
    affine_file = head["fwdtransforms"][0]
    if stripped:
        mask = foreground_mask(image.numpy())
        return image.new_image_like(mask.astype(np.float32)), affine_file
    inverse, invert = [affine_file], [True]
    if be["syn"] and sum(be["syn_iterations"]) > 0:
        syn_spacing = float(be["syn_spacing"])
        syn = ants.registration(
            fixed=templates.resampled("head", syn_spacing),
            moving=_isotropic(image, syn_spacing),
            type_of_transform="SyNOnly",
            initial_transform=[affine_file],
            outprefix=str(workdir / "syn_"),
            syn_metric="mattes",
            reg_iterations=tuple(be["syn_iterations"]),
        )
        inverse = list(syn["invtransforms"])
        invert = [t.endswith(".mat") for t in inverse]
    mask_spacing = float(be["mask_spacing"])
    work = _isotropic(image, mask_spacing)
    warped = ants.apply_transforms(
        fixed=work, moving=templates.mask, transformlist=inverse, whichtoinvert=invert, interpolator="linear"
    )
    closing = round(float(be["closing_mm"]) / mask_spacing)
    mask_work = refine_mask(warped.numpy(), float(be["mask_threshold"]), closing)
    if not mask_work.any():
        raise LDAEError("brain extraction failed: the warped template mask is empty")
    soft = ants.resample_image_to_target(work.new_image_like(mask_work.astype(np.float32)), image,
                                         interp_type="linear")
    return image.new_image_like((soft.numpy() >= 0.5).astype(np.float32)), affine_file


def align_to_template(brain, templates: Templates, cfg: dict, workdir: Path, initial: str) -> list[str]:
    """Affine transform files taking the skull-stripped scan onto the skull-stripped template."""
    reg = cfg["registration"]
    spacing = float(reg["spacing"])
    result = _affine_registration(
        templates.resampled("brain", spacing), _isotropic(brain, spacing), reg, workdir / "brain_", [initial]
    )
    return list(result["fwdtransforms"])


def scale_to_unit(volume: np.ndarray, mask: np.ndarray, lower: float | None, upper: float) -> np.ndarray:
    """Min-max to [0, 1] between the ``lower`` (None: 0, no offset) and ``upper`` percentiles of the
    voxels in ``mask``, clipped; voxels outside the mask become 0."""
    inside = volume[mask]
    if inside.size == 0:
        raise LDAEError("empty brain mask on the output grid: registration failed")
    hi = float(np.percentile(inside, upper))
    lo = 0.0 if lower is None else float(np.percentile(inside, lower))
    if not hi > lo:
        raise LDAEError("the brain has constant intensity after registration")
    out = np.clip((volume - lo) / (hi - lo), 0.0, 1.0)
    return np.where(mask, out, 0.0).astype(np.float32)

