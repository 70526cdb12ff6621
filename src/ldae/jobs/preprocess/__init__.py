"""Raw T1 -> model-ready volume, offline with ANTsPy (optional extra ``ldae[preprocess]``).

Per scan: read and validate (nibabel) -> N4 bias-field correction (fitted on the scan shrunk to
``n4.spacing`` inside a rough head mask) -> brain extraction without networks: affine (+ coarse SyN)
registration of the bundled ICBM 2009c head template to the scan, its brain mask warped back to the
scan's native grid and refined (threshold, closing, hole filling, largest component); a scan that is
already skull-stripped (foreground of brain size) is registered to the template brain instead and keeps
its own mask -> affine
registration of the skull-stripped scan to the skull-stripped template -> one linear resampling from the
native grid onto the paper's grid (:func:`mni_grid`: RAS, 1.5 mm, 128×160×128, centred on the template
brain) -> robust min-max to [0, 1] inside the brain mask. Reorientation to RAS happens in that last
resampling (the output grid is RAS; ANTs names this orientation "LPI").

Each output gets a QC PNG (three orthogonal slices with the template brain outline) and a JSON sidecar
(QC metrics, timings, settings fingerprint); QC warns when the output, smoothed, correlates poorly with the
template brain (:func:`qc_metrics`, calibrated on real scans). The sidecar is written last, so it marks a finished scan:
a batch rerun skips scans whose sidecar matches the current settings (resumable).

Inputs: files, folders, or BIDS roots (``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``). With BIDS names the
cohort CSV rows are built from ``participants.tsv`` / ``sub-*_sessions.tsv`` (see :func:`cohort_rows`).

Modules: ``config`` (settings, validation, fingerprint), ``steps`` (target grid, templates, the ANTs
steps), ``scan`` (one scan + QC + sidecar), ``bids`` (inputs, outputs, cohort rows), ``batch`` (process
pool). The ANTs conversions shared with volumetry live in :mod:`ldae.data.ants`. Everything a caller
uses is re-exported here.
"""

from ldae.data.ants import ants_affine, to_ants
from ldae.io import NIFTI_SUFFIXES, nifti_stem
from ldae.jobs.preprocess.batch import run_batch
from ldae.jobs.preprocess.bids import (
    ScanInput,
    append_cohort_csv,
    cohort_rows,
    describe_input,
    discover_inputs,
    plan_outputs,
)
from ldae.jobs.preprocess.config import (
    CONFIG_NAME,
    config_fingerprint,
    default_config_path,
    load_preprocess_config,
    validate_config,
)
from ldae.jobs.preprocess.scan import (
    QC_JSON_SUFFIX,
    QC_PNG_SUFFIX,
    ScanResult,
    is_finished,
    preprocess_scan,
    qc_metrics,
    qc_paths,
    qc_warnings,
    save_qc_png,
)
from ldae.jobs.preprocess.steps import (
    INSTALL_HINT,
    Templates,
    align_to_template,
    bias_correct,
    extract_brain,
    foreground_mask,
    is_skull_stripped,
    load_scan,
    load_templates,
    mni_grid,
    refine_mask,
    require_ants,
    scale_to_unit,
    template_brain_centre,
)

__all__ = [
    "CONFIG_NAME", "INSTALL_HINT", "NIFTI_SUFFIXES", "QC_JSON_SUFFIX", "QC_PNG_SUFFIX", "ScanInput",
    "ScanResult", "Templates", "align_to_template", "ants_affine", "append_cohort_csv", "bias_correct",
    "cohort_rows", "config_fingerprint", "default_config_path", "describe_input", "discover_inputs",
    "extract_brain", "foreground_mask", "is_finished", "is_skull_stripped", "load_preprocess_config", "load_scan", "load_templates", "mni_grid",
    "nifti_stem", "plan_outputs", "preprocess_scan", "qc_metrics", "qc_paths", "qc_warnings", "refine_mask",
    "require_ants", "run_batch", "save_qc_png", "scale_to_unit", "template_brain_centre", "to_ants",
    "validate_config",
]
