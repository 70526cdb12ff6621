"""Typed results of ``ldae evaluate``: one dataclass per section, fitted probes apart from their metrics.

Why: the sections used to return dicts of ~25 keys that mixed JSON metrics, fitted models and arrays
(fitted probes travelled under a ``"_fit"`` key that every caller had to pop before writing JSON). Here
each section returns a dataclass whose fields say what it holds; fitted models and per-row tables are
fields of their own, and :meth:`to_json` is the one place that says what reaches ``metrics.json``. The
JSON written is key for key (and in the same order) what the dict-based sections wrote, because
``ldae.report``, ``ldae.jobs.demo`` and the tests read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

RECONSTRUCTION_NOTE = "SSIM: 3D Gaussian window sigma 1.5 (truncate 3.5), data range 1; all vs the input scan"


def _field_dict(obj: Any) -> dict[str, Any]:
    """The dataclass's fields in declaration order (shallow: values are already JSON-ready)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _from_result(cls: type, result: dict[str, Any]) -> Any:
    """``cls`` built from the same-named keys of a probe function's result dict (KeyError if one lacks)."""
    return cls(**{f.name: result[f.name] for f in fields(cls)})


# -------------------------------------------------------------------------------------------- probes
@dataclass(frozen=True)
class ClassifierMetrics:
    """Test-split metrics and model selection of the AD-vs-CN logistic probe
    (:func:`ldae.evaluation.probes.probe_ad_vs_cn`), without its arrays."""

    positive_class: str
    negative_class: str
    classes: list[str]
    dropped: dict[str, int]
    accuracy: float
    balanced_accuracy: float
    precision: float
    recall: float
    f1: float
    mcc: float
    auc: float
    auc_ci95: list[float] | None
    n_train: int
    n_test: int
    n_train_subjects: int
    n_test_subjects: int
    C: float
    cv_auc: dict[str, float]
    cv_auc_best: float
    selection: str
    threshold: float
    threshold_cv_balanced_accuracy: float
    threshold_selection: str
    intercept: float

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> ClassifierMetrics:
        return _from_result(cls, result)

    def to_json(self) -> dict[str, Any]:
        return _field_dict(self)


@dataclass(frozen=True)
class RegressorMetrics:
    """Test-split metrics and model selection of a ridge probe (age, a regional volume:
    :func:`ldae.evaluation.probes.probe_regression`), without its arrays."""

    mae: float
    mae_ci95: list[float] | None
    rmse: float
    r2: float | None
    cv_r2: float | None
    n_train: int
    n_test: int
    n_train_subjects: int
    n_test_subjects: int
    alpha: float
    cv_mae: dict[str, float]
    cv_mae_best: float
    selection: str
    intercept: float

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> RegressorMetrics:
        return _from_result(cls, result)

    def to_json(self) -> dict[str, Any]:
        return _field_dict(self)


@dataclass(frozen=True)
class LinearProbeModel:
    """A fitted linear probe on standardised embeddings: ``s(x) = ((x - mean) / scale) · coef + intercept``
    (the logit of P(AD) for the classifier, the estimate for a ridge probe).

    ``direction`` (classifier only) is the unit vector ``(coef / scale) / ||coef / scale||`` in the original
    embedding space: moving an embedding along it raises P(AD), which is what manipulation uses.
    ``test_index``/``test_output`` are the test rows (positions in the probe's input) and their P(AD) or
    estimate."""

    coef: np.ndarray
    intercept: float
    mean: np.ndarray
    scale: np.ndarray
    test_index: np.ndarray
    test_output: np.ndarray
    direction: np.ndarray | None = None

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> LinearProbeModel:
        output = result["test_score"] if "test_score" in result else result["test_prediction"]
        return cls(coef=np.asarray(result["coef"]), intercept=float(result["intercept"]),
                   mean=np.asarray(result["mean"]), scale=np.asarray(result["scale"]),
                   test_index=np.asarray(result["test_index"]), test_output=np.asarray(output),
                   direction=None if result.get("direction") is None else np.asarray(result["direction"]))

    def arrays(self) -> dict[str, Any]:
        """The model part :func:`ldae.evaluation.probes.save_probes` stores."""
        out: dict[str, Any] = {"coef": self.coef, "intercept": self.intercept, "mean": self.mean, "scale": self.scale}
        if self.direction is not None:
            out["direction"] = self.direction
        return out


@dataclass(frozen=True)
class FeatureProbes:
    """Both probes of one feature set (learned y_sem, untrained encoder, latent PCA, oracle, a baseline):
    metrics for ``metrics.json`` and the fitted models, which never reach it."""

    ad_vs_cn: ClassifierMetrics
    age: RegressorMetrics
    ad_model: LinearProbeModel
    age_model: LinearProbeModel

    @classmethod
    def from_results(cls, ad: dict[str, Any], age: dict[str, Any]) -> FeatureProbes:
        """From the dicts :func:`~ldae.evaluation.probes.probe_ad_vs_cn` / ``probe_age`` return."""
        return cls(ClassifierMetrics.from_result(ad), RegressorMetrics.from_result(age),
                   LinearProbeModel.from_result(ad), LinearProbeModel.from_result(age))

    def save(self, path: str | Path, encoder_fingerprint: str | None = None,
             representation_checkpoint: str | Path | None = None) -> Path:
        """Write ``probes.json`` (:func:`ldae.evaluation.probes.save_probes`) for ``ldae predict``, tied to
        the semantic encoder (weights fingerprint) the probes were fitted on."""
        from ldae.evaluation.probes import save_probes

        return save_probes(path, self.ad_vs_cn.to_json() | self.ad_model.arrays(),
                           self.age.to_json() | self.age_model.arrays(), encoder_fingerprint,
                           representation_checkpoint)

    def to_json(self) -> dict[str, Any]:
        return {"ad_vs_cn": self.ad_vs_cn.to_json(), "age": self.age.to_json()}


@dataclass(frozen=True)
class ProbeSection:
    """``probe`` block: :class:`FeatureProbes` per feature set, in evaluation order."""

    sets: dict[str, FeatureProbes]

    def __getitem__(self, name: str) -> FeatureProbes:
        return self.sets[name]

    def to_json(self) -> dict[str, Any]:
        return {name: p.to_json() for name, p in self.sets.items()}


@dataclass(frozen=True)
class FactorFit:
    """Test-split fit of a ridge probe of one known factor (a cohort column) on one feature set, with the
    nested subject-grouped CV R² of the train split (``cv_r2``) as a second estimate."""

    r2: float | None
    cv_r2: float | None
    mae: float
    mae_ci95: list[float] | None
    cv_mae_best: float
    alpha: float
    n_train: int
    n_test: int

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> FactorFit:
        return _from_result(cls, result)

    def to_json(self) -> dict[str, Any]:
        return _field_dict(self)


@dataclass(frozen=True)
class FactorSection:
    """``factors`` block: per feature set, per factor column, a :class:`FactorFit`; ``skipped`` says why
    a requested column was not probed."""

    fits: dict[str, dict[str, FactorFit]]
    skipped: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: {col: f.to_json() for col, f in cols.items()} for name, cols in self.fits.items()}
        out["skipped"] = self.skipped
        return out


# ------------------------------------------------------------------------------------ reconstruction
@dataclass(frozen=True)
class ReconstructionScores:
    """Mean scores of one reconstruction method against the input scans (LPIPS None when unavailable)."""

    ssim: float
    mse: float
    psnr: float
    lpips: float | None
    seconds_per_scan: float

    def to_json(self) -> dict[str, Any]:
        return _field_dict(self)


@dataclass(frozen=True)
class ReconstructionRow:
    """One row of the reconstruction table: a method at a DDIM step count (None: no sampling)."""

    method: str
    steps: int | None
    scores: ReconstructionScores


def _rows_json(rows: list[ReconstructionRow]) -> dict[str, Any]:
    """``{method: scores}`` without steps, ``{method: {str(steps): scores}}`` with (first-seen order)."""
    out: dict[str, Any] = {}
    for row in rows:
        if row.steps is None:
            out[row.method] = row.scores.to_json()
        else:
            out.setdefault(row.method, {})[str(row.steps)] = row.scores.to_json()
    return out


@dataclass(frozen=True)
class ReconstructionSection:
    """``reconstruction`` block (paper table 6) with the per-scan table (``reconstruction.csv``)."""

    rows: list[ReconstructionRow]
    per_scan: pd.DataFrame
    lpips_status: str

    def to_json(self) -> dict[str, Any]:
        return _rows_json(self.rows)


# ------------------------------------------------------------------------------------- interpolation
@dataclass(frozen=True)
class InterpolationSection:
    """``interpolation`` block: per method, the JSON summary of
    :func:`ldae.evaluation.longitudinal.summarize_triplet_scores` (means overall and by time gap,
    prediction gap and relative position); ``scores`` is the per-(triplet, method) table.

    ``comparisons`` (``interpolation_comparison`` in metrics.json) are the paired differences of
    :func:`ldae.evaluation.longitudinal.compare_methods` (which method beats which, with subject-bootstrap
    intervals); ``reference`` says what every prediction is scored against, ``methods`` what each is."""

    summary: dict[str, dict[str, Any]]
    scores: pd.DataFrame
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    reference: str = ""
    methods: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return self.summary

    def comparison_json(self) -> dict[str, Any]:
        return {"reference": self.reference, "methods": self.methods,
                "interval": "95% percentile bootstrap over test subjects of the mean paired difference "
                            "(method - versus) on the same triplets; winner: the side of zero the whole "
                            "interval lies on (null: no clear difference)",
                "pairs": self.comparisons}


# -------------------------------------------------------------------------------------- manipulation
@dataclass(frozen=True)
class ManipulationArm:
    """One direction of manipulation (CN -> AD or AD -> CN): mean regional volume change (%) vs the first
    α per α (keys ``f"{alpha:g}"``), over ``n_scans`` test scans; ``table`` holds the measured volumes
    (``row, alpha, ventricle, hippocampus``; ml). ``image_change`` says how much the decoding changes at
    all: mean over scans of the SSIM and of the mean absolute intensity difference between the decodings at the
    largest and the first α (SSIM near 1: the decoder ignores the step, whatever the volumetry says)."""

    n_scans: int
    change_pct: dict[str, dict[str, float]] = field(default_factory=dict)
    ventricle_monotonic: bool | None = None
    hippocampus_monotonic: bool | None = None
    table: pd.DataFrame | None = None
    image_change: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        if not self.n_scans:
            return {"n_scans": 0}
        return {**self.change_pct, "n_scans": self.n_scans, "ventricle_monotonic": self.ventricle_monotonic,
                "hippocampus_monotonic": self.hippocampus_monotonic, "image_change": self.image_change}


@dataclass(frozen=True)
class VolumetryCheck:
    """Atlas-propagation volumes against the cohort's ground-truth columns on real test scans."""

    n_scans: int
    ventricle_pearson_r: float | None
    hippocampus_pearson_r: float | None

    def to_json(self) -> dict[str, Any]:
        return _field_dict(self)


@dataclass(frozen=True)
class RegionCheck:
    """Does moving along the AD direction change one structure the right way, and by enough?

    ``expected`` is the direction the structure must move (CN -> AD: ventricles ``up``, hippocampus
    ``down``; AD -> CN the reverse). With ``c(α)`` the mean volume change (%) at step α against the first
    step α₀ and ``g`` the cohort's own change (%) from the source group's mean volume to the target
    group's (``gap_pct``), the size is reported as a fraction of that gap: per unit α, the least-squares
    slope of ``c`` on ``α - α₀`` through the origin divided by ``g``; at the largest α, ``c(α_max) / g``.
    It passes only when every step beyond α₀ moves the expected way (``signed``), the changes never turn
    back (``monotonic``: alone, as the old check had it, no pass) and the largest step covers at least the
    configured fraction of the gap (``large_enough``) and clears the volumetry's own noise (``clears_noise``:
    ``|c(α_max)| >= noise_multiple × noise_se_pct``, the standard error of that mean change from the spread of
    each image's volume over ANTs seeds; None when only one seed was measured, which does not fail the check);
    ``reason`` says what failed. ``scans_in_expected_direction`` is the share of scans whose own change at the
    largest α has the expected sign."""

    region: str
    expected: str
    change_pct: list[float]
    gap_pct: float | None
    fraction_of_gap_per_alpha: float | None
    fraction_of_gap_at_max_alpha: float | None
    scans_in_expected_direction: float
    signed: bool
    monotonic: bool
    large_enough: bool | None
    passed: bool
    reason: str
    noise_se_pct: float | None = None
    clears_noise: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return _field_dict(self)


@dataclass(frozen=True)
class ManipulationChecks:
    """The signed, sized checks of both arms (:class:`RegionCheck` per arm and region); ``passed`` only
    when there is at least one check and all of them pass."""

    min_gap_fraction: float
    gap_source: str
    arms: dict[str, dict[str, RegionCheck]]
    noise_multiple: float | None = None

    @property
    def passed(self) -> bool:
        checks = [c for regions in self.arms.values() for c in regions.values()]
        return bool(checks) and all(c.passed for c in checks)

    def to_json(self) -> dict[str, Any]:
        return {"min_gap_fraction": self.min_gap_fraction, "noise_multiple": self.noise_multiple,
                "gap_source": self.gap_source,
                **{arm: {r: c.to_json() for r, c in regions.items()} for arm, regions in self.arms.items()},
                "passed": self.passed}


@dataclass(frozen=True)
class ManipulationSection:
    """``manipulation`` block: the α grid, the arms, the volumetry check, the direction checks and
    ``separation``: where AD and CN scans lie along the direction, in α units
    (:func:`ldae.evaluation.sections.manipulation.class_separation`), so that α_max can be read as a multiple of
    the distance between the groups."""

    alphas: list[float]
    direction: str
    arms: dict[str, ManipulationArm]
    volumetry_check: VolumetryCheck | None = None
    checks: ManipulationChecks | None = None
    separation: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"alphas": self.alphas, "direction": self.direction, "separation": self.separation,
                **{name: arm.to_json() for name, arm in self.arms.items()},
                "volumetry_check": None if self.volumetry_check is None else self.volumetry_check.to_json(),
                "checks": None if self.checks is None else self.checks.to_json()}


# ----------------------------------------------------------------------------------------- baselines
@dataclass(frozen=True)
class BaselineResult:
    """A baseline of the run folder: its probes, and its reconstruction per DDIM step count when it has one."""

    probe: FeatureProbes
    reconstruction: dict[str, ReconstructionScores] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"probe": self.probe.to_json()}
        if self.reconstruction is not None:
            out["reconstruction"] = {steps: s.to_json() for steps, s in self.reconstruction.items()}
        return out


# -------------------------------------------------------------------------------------- diagnostics
@dataclass(frozen=True)
class BandLoss:
    """Mean denoising loss ``‖ε − ε_θ(z_t, t)‖²`` in one timestep band ``[lo, hi)`` on training and held-out
    latents (same draws); ``ratio = train / held_out`` (< 1: the DDPM fits its training latents better)."""

    band: list[int]
    train: float
    held_out: float
    ratio: float | None

    def to_json(self) -> dict[str, Any]:
        return _field_dict(self)


@dataclass(frozen=True)
class BandGap:
    """The posterior-mean gap G_ψ fills in one band on held-out latents: ``plain = ‖ε − ε_θ‖²``, ``own`` /
    ``other`` = ``‖ε − (ε_θ − k_t G_ψ)‖²`` with the scan's own / another subject's y_sem (same draws);
    ``gap_own = (plain − own) / plain``, ``gap_other`` likewise; ``own_beats_other`` = share of scans whose
    own-y_sem loss is below the other-y_sem one. ``gap_own_train``: ``gap_own`` on the *training* latents
    (their own y_sem, their own draws). A memorising G_ψ removes error there and adds it on held-out scans;
    negative on both means G_ψ is not even fitting its training data (seen: y_sem off the distribution G_ψ
    was trained on)."""

    band: list[int]
    plain: float
    own: float
    other: float | None
    gap_own: float | None
    gap_other: float | None
    own_beats_other: float | None
    gap_own_train: float | None = None

    @classmethod
    def from_means(cls, band: list[int], plain: float, own: float, other: float | None,
                   own_beats_other: float | None, train: tuple[float, float] | None = None) -> BandGap:
        """``train``: ``(plain, own)`` means on the training latents, or None."""
        def rel(v: float | None, ref: float = plain) -> float | None:
            return None if v is None or ref <= 0 else (ref - v) / ref

        return cls(band, plain, own, other, rel(own), rel(other), own_beats_other,
                   None if train is None else rel(train[1], train[0]))

    def to_json(self) -> dict[str, Any]:
        return _field_dict(self)


@dataclass(frozen=True)
class DiagnosticsSection:
    """``diagnostics`` block (:mod:`ldae.evaluation.sections.diagnostics`): DDPM memorisation per band, the
    gap G_ψ fills per band, and per feature set the factor R² and AD AUCs on the same split."""

    n_train: int
    n_held_out: int
    draws: int
    seed: int
    bands: list[BandLoss]
    gap: list[BandGap]
    representation: dict[str, dict[str, float | None]]

    def to_json(self) -> dict[str, Any]:
        return {"n_train": self.n_train, "n_held_out": self.n_held_out, "draws": self.draws, "seed": self.seed,
                "denoising_loss": [b.to_json() for b in self.bands], "gap": [g.to_json() for g in self.gap],
                "representation": self.representation}


# ------------------------------------------------------------------------------------------ the whole
@dataclass(frozen=True)
class CohortInfo:
    """Which cohort was evaluated."""

    csv: str
    scans: int
    test_scans: int

    def to_json(self) -> dict[str, Any]:
        return _field_dict(self)


@dataclass(frozen=True)
class EvaluationResult:
    """Everything ``ldae evaluate`` measured; :meth:`to_json` is the content of ``metrics.json``."""

    cohort: CohortInfo
    timings_s: dict[str, float]
    probe: ProbeSection
    factors: FactorSection
    reconstruction: ReconstructionSection
    interpolation: InterpolationSection
    manipulation: ManipulationSection
    baselines: dict[str, BaselineResult | None]
    diagnostics: DiagnosticsSection | None = None
    #: s of the evaluation's decodings from a random z_T (:attr:`ldae.model.LDAE.guidance_scale`)
    guidance_scale: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "cohort": self.cohort.to_json(),
            "guidance_scale": float(self.guidance_scale),
            "timings_s": dict(self.timings_s),
            "probe": self.probe.to_json(),
            "factors": self.factors.to_json(),
            "lpips_status": self.reconstruction.lpips_status,
            "reconstruction": self.reconstruction.to_json(),
            "reconstruction_note": RECONSTRUCTION_NOTE,
            "interpolation": self.interpolation.to_json(),
            "interpolation_comparison": self.interpolation.comparison_json(),
            "manipulation": self.manipulation.to_json(),
            "baselines": {name: None if b is None else b.to_json() for name, b in self.baselines.items()},
            "diagnostics": None if self.diagnostics is None else self.diagnostics.to_json(),
        }
