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
        r = _round  # the CSV stores these values; rounding here makes a CSV row reproduce the subject exactly
        subjects.append(
            SubjectParams(
                subject=f"sub-{i:04d}", index=i, seed=int(seed), group=str(g), converter=converter,
                age_baseline=r(age), severity_baseline=r(severity) if g != "CN" else 0.0,
                severity_rate=r(rate), hippocampus_size=r(hip), ventricle_size=r(vent), head_scale=r(head),
                gamma=r(gamma), intensity_scale=r(scale), noise_level=r(noise),
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
        noise_level=float(row["noise_level"]), visits=tuple(int(v) for v in visits),
    )
