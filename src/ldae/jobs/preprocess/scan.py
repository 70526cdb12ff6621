"""One scan through the whole pipeline (:func:`preprocess_scan`), its quality control (metrics, PNG) and
the JSON sidecar that marks it finished with given settings (written last: a batch rerun skips it)."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ldae.data.ants import seeded
from ldae.io import atomic_path, nifti_stem, write_json, write_nifti
from ldae.jobs.preprocess.config import config_fingerprint
from ldae.jobs.preprocess.steps import (
    Templates,
    align_to_template,
    bias_correct,
    extract_brain,
    is_skull_stripped,
    load_scan,
    load_templates,
    mni_grid,
    require_ants,
    scale_to_unit,
)

QC_PNG_SUFFIX = "_qc.png"
QC_JSON_SUFFIX = "_qc.json"


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0


def qc_metrics(volume: np.ndarray, mask: np.ndarray, templates: Templates, smoothing_mm: float = 3.0
               ) -> dict[str, float]:
    """Registration QC on the output grid, inside the template brain mask ``M``:

    - ``correlation``: Pearson correlation of the output and the template brain, both smoothed by a
      Gaussian of standard deviation ``smoothing_mm`` (``qc.smoothing_mm``) first. One brain differs from
      the template (an average of 152) at the scale of its sulci and gyri, a few mm, so unsmoothed
      voxels of a correctly registered real scan correlate only 0.55-0.65 with it (the official LDAE
      sample 0.55, Colin27 0.65, the template itself 0.97); a misregistration moves whole structures
      (ventricles, the brain's outline), which smoothing keeps. Measured with 3 mm on five real scans
      (the official sample, Colin27 and the ICBM template, with and without skull, each preprocessed
      from a moved copy): 0.87-0.99 (threshold ``qc.min_correlation`` 0.75); the same outputs shifted
      8 mm 0.63-0.65, rotated 10 degrees 0.69-0.72, enlarged 8 % 0.67-0.75, skipping the registration
      0.61-0.74, a skull-stripped scan registered to the template head 0.58-0.60 (all flagged); shifts
      of 5 mm and 8 % shrinkage stay at 0.76-0.82 (not flagged: the check is for gross errors).
    - ``raw_correlation``: the same without smoothing (for information);
    - ``mask_dice``: Dice overlap 2|A∩M| / (|A| + |M|) of the scan's brain mask ``A`` with ``M``.
    """
    from scipy import ndimage

    ref_mask = templates.mask_on_grid
    sigma = float(smoothing_mm) / float(min(templates.grid.spacing))
    key = ("smoothed_brain", round(sigma, 6))
    if key not in templates._cache:
        templates._cache[key] = ndimage.gaussian_filter(templates.brain_on_grid.astype(np.float32), sigma)
    smoothed = ndimage.gaussian_filter(volume.astype(np.float32), sigma) if sigma > 0 else volume
    corr = _pearson(smoothed[ref_mask], templates._cache[key][ref_mask])
    raw = _pearson(volume[ref_mask], templates.brain_on_grid[ref_mask])
    dice = 2.0 * float((mask & ref_mask).sum()) / max(1.0, float(mask.sum() + ref_mask.sum()))
    return {"correlation": round(corr, 4), "raw_correlation": round(raw, 4), "mask_dice": round(dice, 4)}


def qc_warnings(qc: dict[str, float], cfg: dict) -> list[str]:
    """One line per QC value below its threshold (``qc.min_correlation``, ``qc.min_mask_dice``)."""
    limits = cfg["qc"]
    warnings = []
    if qc["correlation"] < float(limits["min_correlation"]):
        warnings.append(f"correlation with the template (smoothed {limits['smoothing_mm']} mm) "
                        f"{qc['correlation']:.3f} < {limits['min_correlation']}: check the registration")
    if qc["mask_dice"] < float(limits["min_mask_dice"]):
        warnings.append(f"brain-mask Dice with the template {qc['mask_dice']:.3f} < {limits['min_mask_dice']}")
    return warnings


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
    with tempfile.TemporaryDirectory(prefix="ldae-preprocess-") as tmp, seeded(cfg.get("seed")):
        workdir = Path(tmp)
        stripped, foreground = is_skull_stripped(image, cfg)
        mask, head_affine = extract_brain(image, templates, cfg, workdir, stripped=stripped)
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
    qc = qc_metrics(volume, mask_grid, templates, float(cfg["qc"]["smoothing_mm"]))
    warnings = qc_warnings(qc, cfg)
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
        "input_kind": {"skull_stripped": stripped, "foreground_ml": foreground},
        "warnings": warnings,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "timings": timings,
        "settings_fingerprint": config_fingerprint(cfg),
        "settings": cfg,
        "versions": {"ldae": __version__, "antspyx": getattr(ants, "__version__", "?")},
    })
    return ScanResult(input_path, output, "done", qc, warnings, seconds)

