"""Raw T1 -> model-ready volume, offline with ANTsPy (optional extra ``ldae[preprocess]``).

Per scan: read and validate (nibabel) -> N4 bias-field correction (fitted on the scan shrunk to
``n4.spacing`` inside a rough head mask) -> brain extraction without networks: affine (+ coarse SyN)
registration of the bundled ICBM 2009c head template to the scan, its brain mask warped back to the
scan's native grid and refined (threshold, closing, hole filling, largest component) -> affine
registration of the skull-stripped scan to the skull-stripped template -> one linear resampling from the
native grid onto the paper's grid (:func:`mni_grid`: RAS, 1.5 mm, 128×160×128, centred on the template
brain) -> robust min-max to [0, 1] inside the brain mask. Reorientation to RAS happens in that last
resampling (the output grid is RAS; ANTs names this orientation "LPI").

Each output gets a QC PNG (three orthogonal slices with the template brain outline) and a JSON sidecar
(QC metrics, timings, settings fingerprint). The sidecar is written last, so it marks a finished scan:
a batch rerun skips scans whose sidecar matches the current settings (resumable).

Inputs: files, folders, or BIDS roots (``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``). With BIDS names the
cohort CSV rows are built from ``participants.tsv`` / ``sub-*_sessions.tsv`` (see :func:`cohort_rows`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ldae.errors import CohortError, ConfigError, LDAEError
from ldae.io import atomic_path, write_csv, write_json, write_nifti

log = logging.getLogger(__name__)

INSTALL_HINT = "raw-T1 preprocessing needs ANTsPy: pip install 'ldae[preprocess]' (or: pip install 'antspyx>=0.4')"
CONFIG_NAME = "preprocess.yaml"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
QC_PNG_SUFFIX = "_qc.png"
QC_JSON_SUFFIX = "_qc.json"


# ----------------------------------------------------------------------------------------------------
# configuration


def default_config_path() -> Path:
    """The packaged defaults (``ldae/configs/preprocess.yaml``)."""
    from ldae.config import configs_root

    return configs_root() / CONFIG_NAME


def load_preprocess_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """Packaged defaults, or a user YAML (which may ``_inherit: preprocess.yaml``), plus dotted
    overrides; validated (ConfigError naming the key and value)."""
    from ldae.config import apply_overrides, deep_merge, load_config

    defaults = load_config(default_config_path())
    cfg = defaults
    if path is not None:
        user = load_config(path)
        _check_known_keys(user, defaults, source=str(path))
        cfg = deep_merge(defaults, user)
    cfg = apply_overrides(cfg, list(overrides)) if overrides else cfg
    validate_config(cfg, source=str(path or default_config_path()))
    return cfg


def _check_known_keys(user: dict, defaults: dict, source: str, prefix: str = "") -> None:
    """ConfigError for a key of ``user`` that the defaults do not have (a typo is not ignored)."""
    for key, value in user.items():
        if key not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' (known here: {known})")
        if isinstance(value, dict) and isinstance(defaults[key], dict):
            _check_known_keys(value, defaults[key], source, f"{prefix}{key}.")


def validate_config(cfg: dict, source: str = "preprocess config") -> None:
    """Raise ConfigError for a missing section or an out-of-range value."""

    def get(key: str) -> Any:
        from ldae.config import get_dotted

        value = get_dotted(cfg, key, default=KeyError)
        if value is KeyError:
            raise ConfigError(f"{source}: missing key '{key}'")
        return value

    def positive(key: str) -> float:
        value = get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{source}: '{key}' must be a positive number, got {value!r}")
        return float(value)

    def int_list(key: str, length: int | None = None, minimum: int = 0) -> list[int]:
        value = get(key)
        ok = isinstance(value, list) and value and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value
        )
        if not ok or (length is not None and len(value) != length):
            size = f"{length} " if length else ""
            raise ConfigError(f"{source}: '{key}' must be a list of {size}integers >= {minimum}, got {value!r}")
        return value

    for key in ("output.spacing", "n4.spacing", "n4.spline_distance", "brain_extraction.spacing",
                "brain_extraction.syn_spacing", "brain_extraction.mask_spacing",
                "registration.spacing", "registration.sampling_rate", "registration.bins",
                "brain_extraction.sampling_rate", "brain_extraction.bins", "n4.tolerance"):
        positive(key)
    int_list("output.shape", 3, minimum=8)
    lo, hi = get("output.lower_percentile"), get("output.upper_percentile")
    number = (int, float)
    if not (isinstance(hi, number) and (lo is None or isinstance(lo, number)) and 0 <= (lo or 0) < hi <= 100):
        raise ConfigError(
            f"{source}: need 0 <= output.lower_percentile (or null) < output.upper_percentile <= 100, "
            f"got {lo!r}, {hi!r}"
        )
    int_list("n4.iterations", minimum=1)
    int_list("brain_extraction.syn_iterations", minimum=0)
    for section in ("brain_extraction", "registration"):
        its = int_list(f"{section}.iterations", minimum=0)
        shrink = int_list(f"{section}.shrink_factors", len(its), minimum=1)
        int_list(f"{section}.smoothing_sigmas", len(shrink), minimum=0)
    threshold = get("brain_extraction.mask_threshold")
    if not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise ConfigError(f"{source}: 'brain_extraction.mask_threshold' must be in (0, 1), got {threshold!r}")
    if not isinstance(get("brain_extraction.closing_mm"), (int, float)) or get("brain_extraction.closing_mm") < 0:
        raise ConfigError(f"{source}: 'brain_extraction.closing_mm' must be >= 0")
    threads = get("threads")
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ConfigError(f"{source}: 'threads' must be an integer >= 0 (0 = automatic), got {threads!r}")
    for key in ("qc.min_correlation", "qc.min_mask_dice"):
        value = get(key)
        if not isinstance(value, (int, float)) or not -1 <= value <= 1:
            raise ConfigError(f"{source}: '{key}' must be in [-1, 1], got {value!r}")


def config_fingerprint(cfg: dict) -> str:
    """Short hash of the settings that change the output (``threads`` does not)."""
    relevant = {k: v for k, v in cfg.items() if k != "threads"}
    text = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def require_ants():
    """Import ANTsPy, or raise LDAEError saying how to install it."""
    try:
        import ants
    except ImportError:
        raise LDAEError(INSTALL_HINT) from None
    return ants


def to_ants(data: np.ndarray, affine: np.ndarray):
    """An ANTs image from a voxel array and its RAS affine (LPS direction/origin for ITK).

    A sheared affine cannot be represented by ITK: its axes are replaced by the nearest rotation (logged).
    """
    ants = require_ants()
    lps = np.diag([-1.0, -1.0, 1.0])
    linear = lps @ np.asarray(affine, dtype=np.float64)[:3, :3]
    origin = lps @ np.asarray(affine, dtype=np.float64)[:3, 3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    if np.abs(direction.T @ direction - np.eye(3)).max() > 1e-4:
        u, _, vt = np.linalg.svd(direction)
        direction = u @ vt
        log.warning("sheared affine: axes replaced by the nearest rotation")
    return ants.from_numpy(
        np.ascontiguousarray(data, dtype=np.float32),
        origin=tuple(float(o) for o in origin),
        spacing=tuple(float(s) for s in spacing),
        direction=direction,
    )


def ants_affine(image) -> np.ndarray:
    """The RAS 4x4 voxel-to-world affine of an ANTs image (inverse of :func:`to_ants`)."""
    lps = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = lps @ np.asarray(image.direction) @ np.diag(image.spacing)
    affine[:3, 3] = lps @ np.asarray(image.origin)
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


# ----------------------------------------------------------------------------------------------------
# pipeline steps


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


def extract_brain(image, templates: Templates, cfg: dict, workdir: Path) -> tuple[Any, str]:
    """Brain mask of ``image`` on its native grid, and the template->scan head affine (transform file).

    The template head is registered to the scan (affine at ``brain_extraction.spacing``, then an
    optional coarse SyN); the 1 mm template brain mask is warped onto the scan resampled to
    ``mask_spacing``, refined there (:func:`refine_mask`), and interpolated onto the native grid.
    """
    ants = require_ants()
    be = cfg["brain_extraction"]
    spacing = float(be["spacing"])
    head = _affine_registration(
        templates.resampled("head", spacing), _isotropic(image, spacing), be, workdir / "head_"
    )
    affine_file = head["fwdtransforms"][0]
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
    closing = int(round(float(be["closing_mm"]) / mask_spacing))
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


def qc_metrics(volume: np.ndarray, mask: np.ndarray, templates: Templates) -> dict[str, float]:
    """Pearson correlation with the template brain inside the template mask, and the Dice overlap of the
    scan's brain mask with the template mask (both on the output grid)."""
    ref_mask = templates.mask_on_grid
    a = volume[ref_mask].astype(np.float64)
    b = templates.brain_on_grid[ref_mask].astype(np.float64)
    corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
    dice = 2.0 * float((mask & ref_mask).sum()) / max(1.0, float(mask.sum() + ref_mask.sum()))
    return {"correlation": round(corr, 4), "mask_dice": round(dice, 4)}


def save_qc_png(path: str | Path, volume: np.ndarray, outline: np.ndarray, title: str) -> Path:
    """Three orthogonal mid-slices of ``volume`` with the contour of ``outline`` (the template brain
    mask) in red: a misregistration shows as brain crossing the outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ldae.viz import orthogonal_slices

    fig, axes = plt.subplots(1, 3, figsize=(9.0, 3.4))
    for ax, sl, ol in zip(axes, orthogonal_slices(volume), orthogonal_slices(outline.astype(np.float32))):
        ax.imshow(sl, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.contour(ol, levels=[0.5], colors="red", linewidths=0.8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------------------------------
# one scan


@dataclass
class ScanResult:
    """Outcome of one scan: outputs, QC metrics and warnings, or the error that stopped it."""

    input: Path
    output: Path
    status: str  # "done", "skipped" (finished before, settings unchanged) or "failed"
    qc: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""


def qc_paths(output: Path) -> tuple[Path, Path]:
    """``(png, json)`` paths of the QC files written beside ``output``."""
    stem = nifti_stem(output)
    return output.with_name(stem + QC_PNG_SUFFIX), output.with_name(stem + QC_JSON_SUFFIX)


def nifti_stem(path: str | Path) -> str:
    """File name without ``.nii``/``.nii.gz``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def is_finished(output: Path, fingerprint: str) -> dict | None:
    """The sidecar of a finished scan made with the same settings, else None."""
    png, sidecar = qc_paths(output)
    if not (output.is_file() and png.is_file() and sidecar.is_file()):
        return None
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("settings_fingerprint") == fingerprint else None


def preprocess_scan(input_path: str | Path, output: str | Path, cfg: dict) -> ScanResult:
    """Run the whole pipeline on one scan; write ``output`` (NIfTI), its QC PNG and JSON sidecar.

    Raises CohortError for an unreadable / non-3D / constant input and LDAEError when a step fails.
    """
    ants = require_ants()
    from ldae import __version__

    input_path, output = Path(input_path), Path(output)
    shape = tuple(int(s) for s in cfg["output"]["shape"])
    spacing = float(cfg["output"]["spacing"])
    if cfg.get("seed") is not None:
        ants.config._random_seed = int(cfg["seed"])  # ANTsPy's switch for --random-seed
    timings: dict[str, float] = {}
    start = t0 = time.perf_counter()
    cpu_start = time.process_time()  # all threads of this process

    def lap(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        timings[name] = round(now - t0, 2)
        t0 = now

    image = load_scan(input_path)
    templates = load_templates(spacing, shape)
    lap("read")
    image = bias_correct(image, cfg)
    lap("n4")
    with tempfile.TemporaryDirectory(prefix="ldae-preprocess-") as tmp:
        workdir = Path(tmp)
        mask, head_affine = extract_brain(image, templates, cfg, workdir)
        brain = image * mask
        lap("brain_extraction")
        transforms = align_to_template(brain, templates, cfg, workdir, head_affine)
        lap("registration")
        warped = ants.apply_transforms(templates.grid, brain, transforms, interpolator="linear").numpy()
        mask_grid = ants.apply_transforms(templates.grid, mask, transforms, interpolator="linear").numpy() >= 0.5
    out_cfg = cfg["output"]
    lower = out_cfg["lower_percentile"]
    volume = scale_to_unit(warped, mask_grid, None if lower is None else float(lower),
                           float(out_cfg["upper_percentile"]))
    qc = qc_metrics(volume, mask_grid, templates)
    warnings = []
    if qc["correlation"] < float(cfg["qc"]["min_correlation"]):
        warnings.append(f"correlation with the template {qc['correlation']:.3f} < {cfg['qc']['min_correlation']}")
    if qc["mask_dice"] < float(cfg["qc"]["min_mask_dice"]):
        warnings.append(f"brain-mask Dice with the template {qc['mask_dice']:.3f} < {cfg['qc']['min_mask_dice']}")
    write_nifti(output, volume, mni_grid(spacing, shape))
    png, sidecar = qc_paths(output)
    verdict = "QC WARNING" if warnings else "QC ok"
    save_qc_png(png, volume, templates.mask_on_grid,
                f"{input_path.name}  corr {qc['correlation']:.3f}  Dice {qc['mask_dice']:.3f}  {verdict}")
    lap("write")
    seconds = round(time.perf_counter() - start, 2)
    cpu_seconds = round(time.process_time() - cpu_start, 2)
    write_json(sidecar, {
        "input": str(input_path.resolve()),
        "output": str(output.resolve()),
        "qc": qc,
        "qc_passed": not warnings,
        "warnings": warnings,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "timings": timings,
        "settings_fingerprint": config_fingerprint(cfg),
        "settings": cfg,
        "versions": {"ldae": __version__, "antspyx": getattr(ants, "__version__", "?")},
    })
    return ScanResult(input_path, output, "done", qc, warnings, seconds)


# ----------------------------------------------------------------------------------------------------
# inputs: files, folders, BIDS

_BIDS_SUB = re.compile(r"^sub-([A-Za-z0-9]+)$")
_BIDS_SES = re.compile(r"^ses-([A-Za-z0-9]+)$")
_BIDS_NAME = re.compile(r"^sub-(?P<sub>[A-Za-z0-9]+)(?:_ses-(?P<ses>[A-Za-z0-9]+))?_")


@dataclass(frozen=True)
class ScanInput:
    """One raw scan, with its BIDS subject/session labels (without prefix) and BIDS root when known."""

    path: Path
    subject: str | None = None
    session: str | None = None
    bids_root: Path | None = None

    @property
    def stem(self) -> str:
        return nifti_stem(self.path)


def describe_input(path: str | Path) -> ScanInput:
    """Subject/session labels from a BIDS file name (``sub-01_ses-M06_T1w.nii.gz``), and the BIDS root
    (the folder above ``sub-*``) when the file sits in a BIDS tree."""
    path = Path(path).resolve()
    match = _BIDS_NAME.match(path.name)
    if not match:
        return ScanInput(path)
    root = None
    for parent in path.parents:
        if _BIDS_SUB.match(parent.name):
            root = parent.parent
            break
    return ScanInput(path, match.group("sub"), match.group("ses"), root)


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.endswith(NIFTI_SUFFIXES)


def discover_inputs(paths: Iterable[str | Path]) -> list[ScanInput]:
    """Scans named by ``paths``: NIfTI files as given; a folder is searched as a BIDS root
    (``sub-*/ses-*/anat/*_T1w.nii[.gz]`` and ``sub-*/anat/*_T1w.nii[.gz]``), else for NIfTI files
    directly inside it. Sorted, duplicates removed; CohortError for a missing path or an empty folder."""
    found: dict[Path, ScanInput] = {}
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            hits = sorted(
                p for pattern in ("sub-*/ses-*/anat/*_T1w.nii*", "sub-*/anat/*_T1w.nii*")
                for p in path.glob(pattern) if _is_nifti(p)
            )
            if not hits:
                hits = sorted(p for p in path.iterdir() if _is_nifti(p))
            if not hits:
                raise CohortError(
                    f"{path}: no T1 scans found (expected sub-*/[ses-*/]anat/*_T1w.nii.gz or NIfTI files)"
                )
            for hit in hits:
                scan = describe_input(hit)
                found.setdefault(scan.path, scan)
        elif path.exists():
            if not path.name.endswith(NIFTI_SUFFIXES):
                raise CohortError(f"{path}: not a NIfTI file (.nii or .nii.gz)")
            scan = describe_input(path)
            found.setdefault(scan.path, scan)
        else:
            raise CohortError(f"{path}: no such file or folder")
    return sorted(found.values(), key=lambda s: str(s.path))


def plan_outputs(scans: Sequence[ScanInput], out: str | Path) -> list[Path]:
    """Output NIfTI path per scan: ``out`` itself for one scan when it ends in .nii[.gz], else
    ``out/<input stem>.nii.gz``; CohortError when two inputs would write the same file."""
    out = Path(out)
    if out.name.endswith(NIFTI_SUFFIXES):
        if len(scans) != 1:
            raise CohortError(f"-o {out}: a file name needs exactly one input scan, got {len(scans)} (give a folder)")
        if out.resolve() == scans[0].path.resolve():
            raise CohortError(f"-o {out}: would overwrite the input scan; choose another output")
        return [out]
    outputs = [out / f"{scan.stem}.nii.gz" for scan in scans]
    seen: dict[Path, Path] = {}
    for scan, output in zip(scans, outputs):
        if output.resolve() == scan.path.resolve():
            raise CohortError(f"-o {out}: would overwrite the input {scan.path}; choose another output")
        if output in seen:
            raise CohortError(f"inputs {seen[output]} and {scan.path} would both write {output}; rename one")
        seen[output] = scan.path
    return outputs


def _read_tsv(path: Path):
    import pandas as pd

    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise CohortError(f"{path}: unreadable TSV ({str(exc).splitlines()[0]})") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    return df


def _first_column(df, names: Sequence[str]) -> str | None:
    return next((n for n in names if n in df.columns), None)


_DIAGNOSIS_COLUMNS = ("diagnosis", "dx", "group")


def _session_months(label: str | None, row: dict) -> int | None:
    """Months since baseline: a ``months`` column of sessions.tsv, else the session label (``M06``,
    ``06``, ``bl``/``baseline`` = 0); no session at all = 0; None when unknown."""
    from ldae.data.cohort import parse_session

    value = row.get("months", "").strip()
    if value:
        try:
            return int(float(value))
        except ValueError:
            return None
    if label is None or label.lower() in ("bl", "baseline"):
        return 0
    try:
        return parse_session(label)
    except ValueError:
        return None


@functools.lru_cache(maxsize=64)
def _participants(root: Path) -> dict[str, dict]:
    path = root / "participants.tsv"
    if not path.is_file():
        return {}
    df = _read_tsv(path)
    if "participant_id" not in df.columns:
        raise CohortError(f"{path}: missing column 'participant_id'")
    return {str(r["participant_id"]).strip(): r for r in df.to_dict("records")}


@functools.lru_cache(maxsize=1024)
def _sessions(root: Path, subject: str) -> dict[str, dict]:
    path = root / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
    if not path.is_file():
        return {}
    df = _read_tsv(path)
    if "session_id" not in df.columns:
        raise CohortError(f"{path}: missing column 'session_id'")
    return {str(r["session_id"]).strip(): r for r in df.to_dict("records")}


def cohort_rows(scans: Sequence[ScanInput], outputs: Sequence[Path]) -> tuple[list[dict], list[str]]:
    """Cohort CSV rows for preprocessed scans, and one reason per scan left out.

    Rule (the cohort schema needs diagnosis and age, so unknown values are never invented):
    subject = ``sub-<label>``; session = months (sessions.tsv ``months``, else the label: ``ses-M06``
    = 6, ``ses-bl`` = 0, no session = 0); diagnosis = sessions.tsv ``diagnosis``/``dx``/``group``, else
    participants.tsv's; age = sessions.tsv ``age``, else participants.tsv ``age`` + months / 12 (age
    at baseline). A scan without a BIDS name, diagnosis or numeric age is left out and reported.
    """
    rows, skipped = [], []
    for scan, output in zip(scans, outputs):
        if scan.subject is None or scan.bids_root is None:
            skipped.append(f"{scan.path.name}: not a BIDS name in a BIDS tree (sub-*/[ses-*/]anat/)")
            continue
        participant = _participants(scan.bids_root).get(f"sub-{scan.subject}", {})
        session_row = _sessions(scan.bids_root, scan.subject).get(f"ses-{scan.session}", {}) if scan.session else {}
        months = _session_months(scan.session, session_row)
        if months is None:
            skipped.append(f"{scan.path.name}: session 'ses-{scan.session}' is not in months (add a 'months' "
                           f"column to sub-{scan.subject}_sessions.tsv)")
            continue
        diagnosis = ""
        for source in (session_row, participant):
            column = next((c for c in _DIAGNOSIS_COLUMNS if str(source.get(c, "")).strip()), None)
            if column:
                diagnosis = str(source[column]).strip()
                break
        age = _number(session_row.get("age"))
        if age is None:
            base = _number(participant.get("age"))
            age = None if base is None else round(base + months / 12.0, 2)
        missing = [name for name, value in (("diagnosis", diagnosis), ("age", age)) if value in ("", None)]
        if missing:
            skipped.append(f"{scan.path.name}: unknown {' and '.join(missing)} (participants.tsv / sessions.tsv)")
            continue
        rows.append({"subject": f"sub-{scan.subject}", "session": months, "path": str(Path(output).resolve()),
                     "diagnosis": diagnosis, "age": age})
    return rows, skipped


def _number(value: Any) -> float | None:
    try:
        number = float(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def append_cohort_csv(csv: str | Path, rows: Sequence[dict]) -> Path:
    """Write ``rows`` to a cohort CSV, appending to an existing one (a row with the same subject and
    session replaces the old one; other columns of the existing CSV are kept)."""
    import pandas as pd

    csv = Path(csv)
    new = pd.DataFrame(list(rows), columns=["subject", "session", "path", "diagnosis", "age"])
    if csv.is_file() and csv.stat().st_size > 0:
        try:
            old = pd.read_csv(csv, dtype={"subject": str})
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise CohortError(f"{csv}: cannot append to an unreadable CSV ({str(exc).splitlines()[0]})") from None
        missing = [c for c in ("subject", "session") if c not in old.columns]
        if missing:
            raise CohortError(f"{csv}: cannot append: missing column(s) {', '.join(missing)}")
        keys = set(zip(new["subject"].astype(str), new["session"].astype(int)))
        from ldae.data.cohort import parse_session

        keep = [
            (str(s), parse_session(m)) not in keys for s, m in zip(old["subject"], old["session"])
        ]
        new = pd.concat([old[keep], new], ignore_index=True)
    return write_csv(csv, new)


# ----------------------------------------------------------------------------------------------------
# batch


def _threads_per_worker(cfg: dict, workers: int) -> int:
    if int(cfg.get("threads", 0)) > 0:
        return int(cfg["threads"])
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _init_worker(threads: int) -> None:
    """Process-pool initializer: ITK reads its thread count from the environment at first use."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def _run_one(input_path: Path, output: Path, cfg: dict) -> ScanResult:
    """Worker entry: never raises, so one bad scan does not stop the batch."""
    start = time.perf_counter()
    try:
        return preprocess_scan(input_path, output, cfg)
    except Exception as exc:  # noqa: BLE001 - collected and listed at the end of the batch
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not isinstance(exc, LDAEError):
            message = f"{type(exc).__name__}: {message}"
        return ScanResult(input_path, output, "failed", seconds=round(time.perf_counter() - start, 2),
                          error=message)


def run_batch(
    scans: Sequence[ScanInput],
    outputs: Sequence[Path],
    cfg: dict,
    workers: int = 1,
    overwrite: bool = False,
    on_result: Callable[[ScanResult], None] | None = None,
) -> list[ScanResult]:
    """Preprocess ``scans`` into ``outputs`` with ``workers`` processes; finished outputs with the same
    settings are skipped unless ``overwrite``. Failures are returned, not raised. ``on_result`` is
    called once per scan as it completes (e.g. to advance a progress bar)."""
    require_ants()
    fingerprint = config_fingerprint(cfg)
    results: list[ScanResult] = []
    todo: list[tuple[Path, Path]] = []
    for scan, output in zip(scans, outputs):
        meta = None if overwrite else is_finished(Path(output), fingerprint)
        if meta is not None:
            result = ScanResult(scan.path, Path(output), "skipped", meta.get("qc", {}), meta.get("warnings", []))
            results.append(result)
            if on_result:
                on_result(result)
        else:
            todo.append((scan.path, Path(output)))
    threads = _threads_per_worker(cfg, workers)
    if workers <= 1 or len(todo) <= 1:
        _init_worker(threads)
        for input_path, output in todo:
            result = _run_one(input_path, output, cfg)
            results.append(result)
            if on_result:
                on_result(result)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_init_worker,
                                 initargs=(threads,)) as pool:
            futures = [pool.submit(_run_one, i, o, copy.deepcopy(cfg)) for i, o in todo]
            for future in as_completed(futures):
                result = future.result()
                results.append(result)
                if on_result:
                    on_result(result)
    order = {Path(o): k for k, o in enumerate(outputs)}
    return sorted(results, key=lambda r: order.get(r.output, 0))
