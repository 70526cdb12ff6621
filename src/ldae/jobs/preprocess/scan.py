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
    load_scan,
    load_templates,
    mni_grid,
    require_ants,
    scale_to_unit,
)

QC_PNG_SUFFIX = "_qc.png"
QC_JSON_SUFFIX = "_qc.json"


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

