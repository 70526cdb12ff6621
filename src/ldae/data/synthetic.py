"""The bundled realistic longitudinal cohort (``ldae synth``): real template anatomy, known ground truth.

Subjects are the ICBM 2009c template (skull-stripped T1, brain mask, CerebrA labels) deformed by a smooth
random diffeomorphism and head scale, aged and given AD-like atrophy (hippocampal shrinkage, ventricle
enlargement, brain shrinkage) through atlas-driven boundary-shift flows, then given a subject-specific
grey/white contrast (drawn from real scans' tissue levels), bias field and noise level (see
``synthetic_params``, ``synthetic_anatomy``, ``synthetic_image``, ``synthetic_contrast``). Every visit is
a new acquisition (``synthetic_params.Acquisition``): a new noise realisation and noise level, its own
bias field, a small rigid residual misregistration and a contrast drift, recorded in the
``acq_*`` columns; the atrophy between visits is the only anatomical change.
Ground-truth volumes are measured from the warped labels on a fixed 1.5 mm grid, whatever the output grid.

Files: ``DIR/images/sub-XXXX_ses-MYY_T1w.nii.gz`` (float32 in [0, 1], RAS, MNI mm), ``DIR/cohort.csv``
(project schema + ``split`` + ground truth + generator parameters), ``DIR/synth_config.yaml`` (resolved
generator config) and ``DIR/synth.json`` (summary, effect sizes, ground-truth AUC). Same seed and config
give a byte-identical CSV and voxel-identical images for any worker count; a rerun keeps the images that
are complete and were made with the same settings (recorded in the NIfTI ``descrip``) and remakes others.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import multiprocessing
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ldae.config import configs_root, dump_config, load_settings
from ldae.data.synthetic_anatomy import random_field
from ldae.data.synthetic_params import (
    _STREAM_ACQ_BIAS,
    _STREAM_BIAS,
    _STREAM_NOISE,
    _STREAM_WARP,
    ACQ_RANGES,
    Acquisition,
    SubjectParams,
    _range,
    draw_acquisition,
    sample_subjects,
    session_state,
    subject_rng,
)
from ldae.errors import ConfigError

GENERATOR_VERSION = 2  # 2: per-visit acquisition variation, tissue levels from real scans
TRUTH_COLUMNS = ("ventricle_volume_ml", "hippocampus_volume_ml", "brain_volume_ml", "atrophy")
AUC_FEATURES = ("hippocampus_volume_ml", "ventricle_volume_ml", "brain_volume_ml", "age")
MIN_AUC_GROUP = 5  # fewer AD or CN subjects than this: the AUC is not reported (NaN)


def default_config_path() -> Path:
    """The packaged generator defaults (``ldae/configs/synth.yaml``)."""
    return configs_root() / "synth.yaml"


def load_synth_config(path: str | Path | None = None, overrides: Sequence[str] | Sequence[tuple] = ()) -> dict:
    """Packaged defaults, deep-merged with the YAML at ``path`` (if any), then dotted overrides; strict keys
    (:func:`ldae.config.load_settings`; the table of contrast sources takes new names)."""
    cfg = load_settings(default_config_path(), path, overrides, open_sections=("intensity.tissue.sources",))
    _validate(cfg)
    return cfg


def _validate(cfg: Mapping[str, Any]) -> None:
    """Reject values the generator cannot use, naming the key."""
    def positive(key: str) -> None:
        section, _, leaf = key.rpartition(".")
        node: Any = cfg
        for part in section.split("."):
            node = node[part]
        value = node[leaf]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ConfigError(f"synth config: {key} must be a positive number (got {value!r})")

    for key in ("grid.spacing", "grid.field_spacing", "grid.truth_spacing", "anatomy.atrophy_grid",
                "anatomy.flow_step", "anatomy.max_shift", "anatomy.warp.grid", "anatomy.warp.squarings",
                "anatomy.hippocampus.smooth", "anatomy.ventricles.smooth", "anatomy.brain.smooth",
                "intensity.normalize_percentile", "intensity.bias_smooth", "acquisition.bias_smooth"):
        positive(key)
    acq = cfg["acquisition"]
    ranges = {key: _range(acq, key, "acquisition") for key in ACQ_RANGES}
    for key in ("noise_factor", "contrast"):
        if not ranges[key][0] > 0:
            raise ConfigError(f"synth config: acquisition.{key} must be positive (got {acq[key]!r})")
    if ranges["bias_amplitude"][0] < 0:
        raise ConfigError(f"synth config: acquisition.bias_amplitude must be >= 0 (got {acq['bias_amplitude']!r})")
    shape = cfg["grid"]["shape"]
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(isinstance(s, int) and s >= 8
                                                                         for s in shape)):
        raise ConfigError(f"synth config: grid.shape must be three integers >= 8 (got {shape!r})")


@dataclass(frozen=True)
class Job:
    """What a worker needs to generate one subject (picklable)."""

    params: SubjectParams
    months: tuple[int, ...]
    cfg: dict
    out: str | None             # cohort folder, or None for ground truth only
    shape: tuple[int, int, int]
    spacing: float


@dataclass
class SynthResult:
    """Outcome of :func:`synthesize`."""

    table: pd.DataFrame
    csv: Path | None
    auc: float
    effects: dict[str, float]
    volumes: int
    written: int
    skipped: int
    seconds: float                       # wall time
    compute_seconds: float               # summed per-volume generation time (all workers)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds_per_volume(self) -> float:
        """Wall time per volume (throughput with all workers)."""
        return self.seconds / max(self.volumes, 1)


def output_grid(shape: Sequence[int], spacing: float):
    """The output grid: ``shape`` voxels of ``spacing`` mm, centred on the template brain (RAS, MNI mm)."""
    from ldae.data.synthetic_anatomy import Grid, load_template

    return Grid.centred(load_template().centre, shape, spacing)


def image_name(subject: str, months: int) -> str:
    """``sub-XXXX_ses-MYY_T1w.nii.gz``."""
    return f"{subject}_ses-M{int(months):02d}_T1w.nii.gz"


def _tag(job: Job, months: int) -> str:
    """Fingerprint of everything that determines one image (stored in the NIfTI ``descrip``)."""
    payload = json.dumps(
        {"v": GENERATOR_VERSION, "cfg": job.cfg, "params": job.params.as_columns(), "months": months,
         "shape": list(job.shape), "spacing": job.spacing},
        sort_keys=True, default=str,
    )
    return f"ldae-synth v{GENERATOR_VERSION} {hashlib.sha1(payload.encode()).hexdigest()[:20]}"


def _is_complete(path: Path, tag: str, shape: Sequence[int]) -> bool:
    """Whether ``path`` is a fully readable image written with the same settings."""
    import nibabel as nib

    if not path.is_file():
        return False
    try:
        img = nib.load(str(path))
        if img.header["descrip"].tobytes().rstrip(b"\0").decode(errors="replace") != tag:
            return False
        if tuple(img.shape) != tuple(shape):
            return False
        data = np.asarray(img.dataobj, dtype=np.float32)  # decompresses all: catches truncation / CRC errors
        return bool(np.isfinite(data).all())
    except Exception:  # noqa: BLE001 - anything unreadable is regenerated
        return False


def _write_image(path: Path, volume: np.ndarray, affine: np.ndarray, tag: str) -> None:
    """Atomic float32 NIfTI with qform/sform and the settings fingerprint in ``descrip``."""
    import nibabel as nib

    from ldae.io import atomic_path

    img = nib.Nifti1Image(np.asarray(volume, np.float32), np.asarray(affine, np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header["descrip"] = tag.encode()
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def generate_subject(job: Job) -> tuple[list[dict], float, int, int]:
    """All visits of one subject: rows (ground truth + parameters), compute seconds, written, skipped."""
    from ldae.data.synthetic_anatomy import Grid, SubjectAnatomy, atrophy_fields, load_template

    p, cfg = job.params, job.cfg
    template = load_template()
    fields = atrophy_fields(template, cfg)
    t0 = time.perf_counter()
    states = [session_state(p, m, cfg) for m in job.months]
    acquisitions = [draw_acquisition(p, m, cfg) for m in job.months]
    amplitudes = [fields.amplitudes_for(s.log_ratio) for s in states]
    reach = max(sum(abs(a) for a in amp.values()) for amp in amplitudes)
    anatomy = SubjectAnatomy(template, fields, cfg, p.head_scale, subject_rng(p.seed, p.index, _STREAM_WARP), reach)
    out_grid = Grid.centred(template.centre, job.shape, job.spacing) if job.out else None
    log_bias: np.ndarray | None = None
    rows, written, skipped = [], 0, 0
    for state, amp, acq in zip(states, amplitudes, acquisitions):
        session = anatomy.session(amp, where=f"{p.subject} month {state.months}")
        path = Path(job.out, "images", image_name(p.subject, state.months)) if job.out else None
        if path is not None and out_grid is not None:
            tag = _tag(job, state.months)
            if _is_complete(path, tag, job.shape):
                skipped += 1
            else:
                if log_bias is None:  # one smooth bias field per subject (same scanner at every visit)
                    intensity = cfg["intensity"]
                    bias_rng = subject_rng(p.seed, p.index, _STREAM_BIAS)
                    unit = random_field(bias_rng, anatomy.warp_grid, float(intensity["bias_smooth"]), 1)[0]
                    log_bias = unit * np.float32(float(intensity["bias_amplitude"]))
                visit_rng = subject_rng(p.seed, p.index, _STREAM_ACQ_BIAS, state.months)
                smooth = float(cfg["acquisition"]["bias_smooth"])
                visit_bias = random_field(visit_rng, anatomy.warp_grid, smooth, 1)[0] * np.float32(acq.bias_amp)
                volume = _render(anatomy, session, out_grid, log_bias + visit_bias, p, acq, state.months, cfg)
                _write_image(path, volume, out_grid.affine, tag)
                written += 1
        rows.append(_row(p, state, session, anatomy, path, acq))
    return rows, time.perf_counter() - t0, written, skipped


def _render(anatomy: Any, session: Any, out_grid: Any, log_bias: np.ndarray, p: SubjectParams,
            acq: Acquisition, months: int, cfg: Mapping[str, Any]) -> np.ndarray:
    """The visit's image: warped template T1 seen through the visit's rigid residual misregistration and
    the subject's and visit's intensity model, zero outside the brain. The bias field is sampled in the
    scanner frame (unmoved output points): it does not move with the head."""
    from ldae.data.synthetic_anatomy import sample, template_intensity
    from ldae.data.synthetic_image import render_intensity

    t = anatomy.template
    motion = acq.rigid(t.centre)
    idx, pts, psi, mask = anatomy.output_samples(session, out_grid, float(cfg["intensity"]["mask_threshold"]),
                                                 motion)
    t1 = sample(template_intensity(t, out_grid.spacing), t.grid, psi)
    bias = sample(log_bias, anatomy.warp_grid, pts, mode="nearest")
    noise_rng = subject_rng(p.seed, p.index, _STREAM_NOISE, months)
    volume = np.zeros(out_grid.shape, np.float32)
    volume[idx] = render_intensity(t1, mask, bias, p, acq, cfg["intensity"], noise_rng)
    return volume


def _row(p: SubjectParams, state: Any, session: Any, anatomy: Any, path: Path | None, acq: Acquisition) -> dict:
    row = {
        "subject": p.subject,
        "session": state.months,
        "path": str(path) if path is not None else f"images/{image_name(p.subject, state.months)}",
        "diagnosis": state.diagnosis,
        "age": round(state.age, 2),
        "ventricle_volume_ml": round(session.volumes["ventricle_volume_ml"], 3),
        "hippocampus_volume_ml": round(session.volumes["hippocampus_volume_ml"], 3),
        "brain_volume_ml": round(session.volumes["brain_volume_ml"], 2),
        "atrophy": round(state.severity, 4),
    }
    row.update(p.as_columns())
    row["warp_scale"] = anatomy.warp_scale
    row["min_jacobian"] = round(session.min_jacobian, 4)
    row.update(acq.as_columns())
    return row


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _run_jobs(jobs: list[Job], workers: int, progress: bool, total: int) -> Iterable[tuple[Job, tuple]]:
    """Yield ``(job, result)`` as subjects finish (in-process for one worker), with a rich progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TextColumn("volumes"),
               TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("synth", total=total)
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                result = generate_subject(job)
                bar.advance(task, len(job.months))
                yield job, result
            return
        # fork (Linux): workers inherit the parent's loaded template and fields (copy-on-write), and callers
        # need no `if __name__ == "__main__"` guard; the workers use only numpy/scipy/nibabel
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(generate_subject, job): job for job in jobs}
            try:
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        job = futures[fut]
                        result = fut.result()
                        bar.advance(task, len(job.months))
                        yield job, result
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def synthesize(
    out: str | Path | None,
    n_subjects: int | None = None,
    seed: int = 0,
    shape: Sequence[int] | None = None,
    spacing: float | None = None,
    workers: int | None = None,
    cfg: Mapping[str, Any] | None = None,
    images: bool = True,
    baseline_only: bool = False,
    progress: bool = False,
) -> SynthResult:
    """Generate the cohort. ``out=None`` or ``images=False`` runs the ground-truth-only path (same code,
    no image rendering); ``baseline_only`` keeps month 0 only. Returns the table, AUC and timings."""
    from ldae.data.cohort import assign_splits, summarize, write_cohort
    from ldae.data.synthetic_anatomy import atrophy_fields, load_template, template_intensity
    from ldae.io import write_json, write_text

    cfg = dict(cfg) if cfg is not None else load_synth_config()
    _validate(cfg)
    n_subjects = int(cfg["cohort"]["subjects"] if n_subjects is None else n_subjects)
    shape = tuple(int(s) for s in (cfg["grid"]["shape"] if shape is None else shape))
    spacing = float(cfg["grid"]["spacing"] if spacing is None else spacing)
    if len(shape) != 3 or min(shape) < 8 or not spacing > 0:
        raise ConfigError(f"synth: --shape needs three sizes >= 8 and --spacing > 0 (got {shape}, {spacing})")
    workers = _default_workers() if workers is None else max(1, int(workers))
    cfg = copy.deepcopy(cfg)  # the saved config states what was actually generated
    cfg["cohort"]["subjects"], cfg["grid"]["shape"], cfg["grid"]["spacing"] = n_subjects, list(shape), spacing
    template = load_template()  # raises a clear LDAEError before any work when templates are missing
    atrophy_fields(template, cfg)  # built once here: forked workers inherit these caches
    if images and out is not None:
        template_intensity(template, spacing)
    subjects = sample_subjects(n_subjects, seed, cfg)
    write_images = images and out is not None
    jobs = [
        Job(p, (0,) if baseline_only else p.visits, cfg, str(Path(out).resolve()) if write_images else None,
            shape, spacing)  # type: ignore[arg-type]
        for p in subjects
    ]
    total = sum(len(j.months) for j in jobs)
    t0 = time.perf_counter()
    results: dict[int, tuple] = {}
    for job, result in _run_jobs(jobs, min(workers, len(jobs)), progress, total):
        results[job.params.index] = result
    seconds = time.perf_counter() - t0
    rows = [row for i in sorted(results) for row in results[i][0]]
    split = cfg["cohort"]["split"]
    table = assign_splits(pd.DataFrame(rows), test_fraction=float(split["test_fraction"]),
                          val_fraction=float(split["val_fraction"]), seed=seed)
    first = ["subject", "session", "path", "diagnosis", "age", "split", *TRUTH_COLUMNS]
    table = table[first + [c for c in table.columns if c not in first]]
    auc = ground_truth_auc(table, seed=seed)
    effects = effect_sizes(table)
    summary = {
        "generator_version": GENERATOR_VERSION, "seed": seed, "subjects": n_subjects, "volumes": total,
        "shape": list(shape), "spacing": spacing,
        "ground_truth_auc_ad_vs_cn": None if math.isnan(auc) else round(auc, 4),
        "auc_features": list(AUC_FEATURES), "effects": effects, "cohort": summarize(table),
    }
    csv = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if write_images:
            csv = write_cohort(table, out / "cohort.csv")
        else:
            csv = write_cohort(table.assign(path=[str(out / p) for p in table["path"]]), out / "truth.csv")
        write_text(out / "synth_config.yaml", dump_config(cfg))
        write_json(out / "synth.json", summary)
    written = sum(r[2] for r in results.values())
    skipped = sum(r[3] for r in results.values())
    compute = sum(r[1] for r in results.values())
    return SynthResult(table, csv, auc, effects, total, written, skipped, seconds, compute, summary)


def ground_truth(n_subjects: int, seed: int = 0, cfg: Mapping[str, Any] | None = None,
                 baseline_only: bool = False, workers: int = 1) -> pd.DataFrame:
    """The cohort table without images (ground-truth-only path of :func:`synthesize`)."""
    return synthesize(None, n_subjects, seed, cfg=cfg, images=False, baseline_only=baseline_only,
                      workers=workers).table


def ground_truth_auc(table: pd.DataFrame, seed: int = 0, folds: int = 5) -> float:
    """Cross-validated AD-vs-CN ROC-AUC of a logistic regression on the baseline ground truth
    (hippocampus, ventricle, brain volume, age): mean over stratified folds; NaN with fewer than
    ``MIN_AUC_GROUP`` AD or CN subjects."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    base = table.sort_values(["subject", "session"]).groupby("subject", sort=True).first()
    base = base[base["diagnosis"].isin(["AD", "CN"])]
    y = (base["diagnosis"] == "AD").to_numpy(int)
    smallest = int(np.bincount(y, minlength=2).min())
    if smallest < MIN_AUC_GROUP:
        return float("nan")
    n_splits = min(folds, smallest)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    scores = cross_val_score(model, base[list(AUC_FEATURES)].to_numpy(float), y, cv=cv, scoring="roc_auc")
    return float(np.mean(scores))


def effect_sizes(table: pd.DataFrame) -> dict[str, float]:
    """Baseline AD-vs-CN differences (%) and mean annual volume change (%/yr) per baseline group."""
    base = table.sort_values(["subject", "session"]).groupby("subject", sort=True).first()
    out: dict[str, float] = {}
    cn, ad = base[base["diagnosis"] == "CN"], base[base["diagnosis"] == "AD"]
    for col, name in (("hippocampus_volume_ml", "hippocampus"), ("ventricle_volume_ml", "ventricle"),
                      ("brain_volume_ml", "brain")):
        if len(cn) and len(ad):
            out[f"{name}_ad_vs_cn_pct"] = round(float(100.0 * (ad[col].mean() / cn[col].mean() - 1.0)), 2)
    for group in ("CN", "MCI", "AD"):
        for col, name in (("hippocampus_volume_ml", "hippocampus"), ("ventricle_volume_ml", "ventricle")):
            slopes = []
            for _, g in table[table["group"] == group].groupby("subject"):
                if len(g) >= 2:
                    years = g["session"].to_numpy(float) / 12.0
                    slopes.append(np.polyfit(years, np.log(g[col].to_numpy(float)), 1)[0])
            if slopes:
                out[f"{name}_change_pct_per_year_{group}"] = round(100.0 * math.expm1(float(np.mean(slopes))), 2)
    return out
