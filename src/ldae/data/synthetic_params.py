"""Who is in the synthetic cohort: per-subject parameters and per-session disease state.

Every random draw of a subject comes from its own ``numpy.random.SeedSequence(seed, spawn_key=...)``, so
a subject is the same whatever the worker count or the order of generation. Diagnoses are assigned by
quota (largest remainder of the configured proportions) and a seeded permutation, so even a small cohort
holds every group. Effects are expressed as log volume ratios relative to the template anatomy; the
anatomy module turns them into deformations, and the ground truth is then *measured*, not assumed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ldae.errors import ConfigError

GROUPS = ("CN", "MCI", "AD")
STRUCTURES = ("hippocampus", "ventricles", "brain")

# spawn keys of the independent random streams (kept fixed: changing one must not shift another)
_KEY_COHORT = 0
_KEY_SUBJECT = 1
_STREAM_PARAMS, _STREAM_WARP, _STREAM_BIAS, _STREAM_NOISE = 0, 1, 2, 3
_STREAM_ACQ, _STREAM_ACQ_BIAS = 4, 5  # per visit (+ session month): acquisition scalars, the visit's bias field


def rng_for(seed: int, *key: int) -> np.random.Generator:
    """An independent generator for stream ``key`` of cohort ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)))


def subject_rng(seed: int, index: int, stream: int, *extra: int) -> np.random.Generator:
    """Stream ``stream`` (params, warp, bias, noise + session month) of subject ``index``."""
    return rng_for(seed, _KEY_SUBJECT, index, stream, *extra)


@dataclass(frozen=True)
class SubjectParams:
    """Everything drawn for one subject; with ``seed`` and ``index`` it reproduces the subject exactly."""

    subject: str
    index: int
    seed: int
    group: str                     # baseline diagnosis
    converter: bool                # MCI that progresses at the AD rate and converts
    age_baseline: float
    severity_baseline: float
    severity_rate: float           # per year
    hippocampus_size: float        # multiplicative inter-subject factor on the volume
    ventricle_size: float
    head_scale: float
    gamma: float
    intensity_scale: float
    noise_level: float
    gm_level: float                # grey matter intensity relative to white matter (before gamma)
    csf_level: float               # CSF intensity relative to white matter
    visits: tuple[int, ...] = field(default_factory=tuple)

    def as_columns(self) -> dict[str, Any]:
        """Generator-parameter columns of the cohort CSV (rounded for a stable text form)."""
        d = asdict(self)
        d.pop("subject")
        d.pop("visits")
        out: dict[str, Any] = {
            "group": d.pop("group"),
            "converter": int(d.pop("converter")),
            "subject_index": d.pop("index"),
            "generator_seed": d.pop("seed"),
        }
        out.update({k: float(v) for k, v in d.items()})
        return out


@dataclass(frozen=True)
class SessionState:
    """Disease state of one visit and its target log volume ratios (relative to the template)."""

    months: int
    age: float
    severity: float
    diagnosis: str
    log_ratio: dict[str, float]


def _round(x: float) -> float:
    return round(float(x), 6)


def _by_group(cfg: Mapping[str, Any], key: str) -> dict[str, float]:
    value = cfg.get(key)
    if not isinstance(value, Mapping) or set(value) != set(GROUPS):
        raise ConfigError(f"synth config: '{key}' must map each of {', '.join(GROUPS)} to a number")
    return {g: float(value[g]) for g in GROUPS}


def group_counts(n_subjects: int, proportions: Mapping[str, float]) -> dict[str, int]:
    """Subjects per group: ``proportions`` (normalised) times ``n_subjects`` by largest remainder."""
    if n_subjects < 1:
        raise ConfigError(f"synth: the number of subjects must be >= 1 (got {n_subjects})")
    p = np.array([float(proportions.get(g, 0.0)) for g in GROUPS])
    if (p < 0).any() or p.sum() <= 0 or set(proportions) - set(GROUPS):
        raise ConfigError(
            f"synth config: cohort.diagnosis_proportions must give non-negative weights for "
            f"{', '.join(GROUPS)} (got {dict(proportions)})"
        )
    quota = p / p.sum() * n_subjects
    counts = np.floor(quota).astype(int)
    for k in np.argsort(-(quota - counts), kind="stable")[: n_subjects - int(counts.sum())]:
        counts[k] += 1
    return {g: int(c) for g, c in zip(GROUPS, counts)}


def sample_subjects(n_subjects: int, seed: int, cfg: Mapping[str, Any]) -> list[SubjectParams]:
    """Draw ``n_subjects`` subjects (``sub-0000`` ...) for cohort ``seed`` from the generator config."""
    cohort, disease, anatomy, intensity = cfg["cohort"], cfg["disease"], cfg["anatomy"], cfg["intensity"]
    counts = group_counts(n_subjects, cohort["diagnosis_proportions"])
    groups = np.array([g for g in GROUPS for _ in range(counts[g])])
    groups = groups[rng_for(seed, _KEY_COHORT).permutation(n_subjects)]
    age_mean, age_sd = _by_group(cohort, "age_mean"), _by_group(cohort, "age_sd")
    sev_mean, sev_sd = _by_group(disease, "severity_mean"), _by_group(disease, "severity_sd")
    sev_min = _by_group(disease, "severity_min")
    rate_mean, rate_sd = _by_group(disease, "rate_mean"), _by_group(disease, "rate_sd")
    age_lo, age_hi = (float(a) for a in cohort["age_range"])
    months = [int(m) for m in cohort["visit_months"]]
    v_lo, v_hi = (int(v) for v in cohort["visits"])
    if not 1 <= v_lo <= v_hi <= len(months) or months != sorted(set(months)) or months[0] != 0:
        raise ConfigError(
            f"synth config: cohort.visits {cohort['visits']} must satisfy 1 <= min <= max <= "
            f"{len(months)} and cohort.visit_months must increase from 0 (got {months})"
        )
    hs_lo, hs_hi = (float(v) for v in anatomy["head_scale_range"])
    n_lo, n_hi = (float(v) for v in intensity["noise_level"])
    tissue = intensity["tissue"]

    subjects = []
    for i, g in enumerate(groups):
        rng = subject_rng(seed, i, _STREAM_PARAMS)
        # fixed draw order: adding a parameter at the end never changes the earlier ones
        converter = bool(rng.random() < float(disease["converter_fraction"])) and g == "MCI"
        age = float(np.clip(rng.normal(age_mean[g], age_sd[g]), age_lo, age_hi))
        severity = max(sev_min[g], float(rng.normal(sev_mean[g], sev_sd[g])))
        rg = "AD" if converter else g
        rate = max(0.0, float(rng.normal(rate_mean[rg], rate_sd[rg])))
        hip = math.exp(float(rng.normal(0.0, float(anatomy["hippocampus"]["size_sd"]))))
        vent = math.exp(float(rng.normal(0.0, float(anatomy["ventricles"]["size_sd"]))))
        head = float(np.clip(rng.normal(1.0, float(anatomy["head_scale_sd"])), hs_lo, hs_hi))
        gamma = float(intensity["gamma_mean"]) * math.exp(float(rng.normal(0.0, float(intensity["gamma_sd"]))))
        scale = math.exp(float(rng.normal(0.0, float(intensity["scale_sd"]))))
        noise = float(rng.uniform(n_lo, n_hi))
        n_visits = int(rng.integers(v_lo, v_hi + 1))
        gm, csf = tissue_levels(rng, tissue)
        r = _round  # the CSV stores these values; rounding here makes a CSV row reproduce the subject exactly
        subjects.append(
            SubjectParams(
                subject=f"sub-{i:04d}", index=i, seed=int(seed), group=str(g), converter=converter,
                age_baseline=r(age), severity_baseline=r(severity) if g != "CN" else 0.0,
                severity_rate=r(rate), hippocampus_size=r(hip), ventricle_size=r(vent), head_scale=r(head),
                gamma=r(gamma), intensity_scale=r(scale), noise_level=r(noise), gm_level=r(gm), csf_level=r(csf),
                visits=tuple(months[:n_visits]),
            )
        )
    return subjects


def session_state(p: SubjectParams, months: int, cfg: Mapping[str, Any]) -> SessionState:
    """Age, severity, diagnosis and target log volume ratios of subject ``p`` at ``months``."""
    anatomy, disease = cfg["anatomy"], cfg["disease"]
    years = months / 12.0
    age = p.age_baseline + years
    severity = p.severity_baseline + p.severity_rate * years if p.group != "CN" else 0.0
    severity = min(severity, float(disease["severity_max"]))
    diagnosis = p.group
    if p.converter and severity >= float(disease["conversion_severity"]):
        diagnosis = "AD"
    dt = age - float(anatomy["age_reference"])
    hip, vent, brain = anatomy["hippocampus"], anatomy["ventricles"], anatomy["brain"]
    log_ratio = {
        "hippocampus": math.log(p.hippocampus_size)
        + dt * math.log1p(-float(hip["age_loss_per_year"]))
        + math.log(max(0.2, 1.0 - float(hip["ad_loss"]) * severity)),
        "ventricles": math.log(p.ventricle_size)
        + dt * math.log1p(float(vent["age_gain_per_year"]))
        + math.log1p(float(vent["ad_gain"]) * severity),
        "brain": dt * math.log1p(-float(brain["age_loss_per_year"]))
        + math.log(max(0.5, 1.0 - float(brain["ad_loss"]) * severity)),
    }
    return SessionState(months=int(months), age=age, severity=severity, diagnosis=diagnosis, log_ratio=log_ratio)


def subject_from_row(row: Mapping[str, Any], visits: tuple[int, ...] = ()) -> SubjectParams:
    """Rebuild a subject's parameters from the generator columns of a cohort CSV row."""
    return SubjectParams(
        subject=str(row["subject"]), index=int(row["subject_index"]), seed=int(row["generator_seed"]),
        group=str(row["group"]), converter=bool(int(row["converter"])),
        age_baseline=float(row["age_baseline"]), severity_baseline=float(row["severity_baseline"]),
        severity_rate=float(row["severity_rate"]), hippocampus_size=float(row["hippocampus_size"]),
        ventricle_size=float(row["ventricle_size"]), head_scale=float(row["head_scale"]),
        gamma=float(row["gamma"]), intensity_scale=float(row["intensity_scale"]),
        noise_level=float(row["noise_level"]), gm_level=float(row["gm_level"]), csf_level=float(row["csf_level"]),
        visits=tuple(int(v) for v in visits),
    )


# ------------------------------------------------------------------------------- contrast and acquisition
def _range(cfg: Mapping[str, Any], key: str, where: str) -> tuple[float, float]:
    """A ``[lo, hi]`` pair of numbers with ``lo <= hi`` (ConfigError naming ``where.key`` otherwise)."""
    value = cfg.get(key)
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok or float(value[0]) > float(value[1]):
        raise ConfigError(f"synth config: {where}.{key} must be [low, high] with low <= high (got {value!r})")
    return float(value[0]), float(value[1])


def tissue_levels(rng: np.random.Generator, tissue: Mapping[str, Any]) -> tuple[float, float]:
    """A subject's grey matter and CSF intensity relative to white matter.

    The levels of the real sources in ``tissue.sources`` (measured on each, see ``synthetic_contrast``) are
    mixed with Dirichlet(1) weights, then the white-to-grey and white-to-CSF gaps are multiplied by a
    contrast factor ``c ~ U(tissue.contrast)``: ``level = 1 - c * (1 - sum_k w_k level_k)``. Averages of
    many scans (the sources here) blur grey into white matter and so show less contrast than one scan,
    hence ``c`` may exceed 1.
    """
    sources = tissue.get("sources")
    if not isinstance(sources, Mapping) or not sources:
        raise ConfigError("synth config: intensity.tissue.sources must map source names to {csf, gm} levels")
    levels = []
    for name, lv in sources.items():
        try:
            csf, gm = float(lv["csf"]), float(lv["gm"])
        except (TypeError, KeyError, ValueError):
            raise ConfigError(f"synth config: intensity.tissue.sources.{name} needs numbers csf and gm") from None
        if not 0.0 < csf < gm < 1.0:
            raise ConfigError(f"synth config: intensity.tissue.sources.{name}: need 0 < csf < gm < 1 "
                              f"(got csf {csf}, gm {gm})")
        levels.append((gm, csf))
    lo, hi = _range(tissue, "contrast", "intensity.tissue")
    if not lo > 0 or not 1.0 - hi * (1.0 - min(lv[1] for lv in levels)) > 0:
        raise ConfigError(f"synth config: intensity.tissue.contrast {[lo, hi]} must be positive and keep CSF "
                          "above zero (1 - high * (1 - csf) > 0 for every source)")
    w = rng.dirichlet(np.ones(len(levels)))
    c = float(rng.uniform(lo, hi))
    gm, csf = (float(np.dot(w, [lv[i] for lv in levels])) for i in range(2))
    return 1.0 - c * (1.0 - gm), 1.0 - c * (1.0 - csf)


ACQ_RANGES = ("noise_factor", "bias_amplitude", "rotation_deg", "shift_mm", "contrast")


@dataclass(frozen=True)
class Acquisition:
    """How one visit was acquired and registered: what differs between repeat scans of the same brain.

    ``noise_sd``: noise std (template white matter = 1; the subject's level times a per-visit factor);
    ``bias_amp``: std of the log of the visit's own smooth bias field (on top of the subject's);
    ``rot_deg``/``shift_mm``: residual rigid misregistration after registration to MNI, rotation about
    the x, y, z axes through the brain centre (applied x first) and translation;
    ``contrast``: factor on the subject's white-to-grey and white-to-CSF gaps (contrast drift).

    There is no global gain: every scan is scaled by a percentile of its own brain (here and in the
    model-ready transform), which cancels any gain exactly. What reaches the model of a session's
    intensity drift is the tissue level relative to that percentile, moved here by the contrast drift and
    by the visit's noise and bias field (measured: see the README's synthetic-cohort section).
    """

    noise_sd: float
    bias_amp: float
    rot_deg: tuple[float, float, float]
    shift_mm: tuple[float, float, float]
    contrast: float

    def as_columns(self) -> dict[str, float]:
        """The ``acq_*`` ground-truth columns of the cohort CSV."""
        out = {"acq_noise_sd": self.noise_sd, "acq_bias_amp": self.bias_amp}
        out.update({f"acq_rot_deg_{a}": v for a, v in zip("xyz", self.rot_deg)})
        out.update({f"acq_shift_mm_{a}": v for a, v in zip("xyz", self.shift_mm)})
        out["acq_contrast"] = self.contrast
        return out

    def rotation(self) -> np.ndarray:
        """``R = Rz Ry Rx`` (3x3) of the rotation angles."""
        ax, ay, az = (math.radians(a) for a in self.rot_deg)
        rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
        ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
        rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
        return rz @ ry @ rx

    def rigid(self, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(R, b)`` with ``x -> R x + b = c + R (x - c) + shift``: where an output point finds the subject."""
        r = self.rotation()
        c = np.asarray(centre, float)
        return r, c - r @ c + np.asarray(self.shift_mm, float)


def draw_acquisition(p: SubjectParams, months: int, cfg: Mapping[str, Any]) -> Acquisition:
    """The acquisition of subject ``p``'s visit at ``months``: each value uniform in its configured
    ``acquisition`` range, from the visit's own stream (seeded by cohort seed, subject and month)."""
    acq = cfg["acquisition"]
    ranges = {k: _range(acq, k, "acquisition") for k in ACQ_RANGES}
    rng = subject_rng(p.seed, p.index, _STREAM_ACQ, months)
    r = _round

    def draw(key: str, n: int | None = None) -> Any:
        lo, hi = ranges[key]
        return tuple(r(v) for v in rng.uniform(lo, hi, n)) if n else r(rng.uniform(lo, hi))

    noise = r(p.noise_level * draw("noise_factor"))
    return Acquisition(noise_sd=noise, bias_amp=draw("bias_amplitude"), rot_deg=draw("rotation_deg", 3),
                       shift_mm=draw("shift_mm", 3), contrast=draw("contrast"))
