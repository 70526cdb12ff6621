"""``ldae bench`` settings: ``configs/bench.yaml`` merged with the command-line flags, and the preset's stage
configs whose networks are built.

:func:`bench_config` is the only place that reads ``bench.yaml``; :func:`options_from_config` validates every
value once, so the measuring code can trust :class:`BenchOptions`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from ldae import config
from ldae.config import configs_root, load_preset, load_settings
from ldae.errors import ConfigError

#: the sections of a benchmark run, in the order they run (``train`` only with ``--train``)
SECTIONS = ("gemm", "unet", "variants", "shared", "recon", "voxel", "decode", "train", "compile")
#: the stage configs a preset's networks are built from: the method's three and the voxel-space baseline
STAGES = (*config.STAGES, "voxel_dae")
#: the stages ``--train`` can measure (each one's LightningModule ``training_step``)
TRAIN_STAGES = STAGES
#: ``--precision`` choices (Lightning's names); ``preset`` = each stage's ``trainer.precision``
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


@dataclass
class TrainOptions:
    """Settings of the training-step section (``bench.yaml`` ``train``, see :func:`train_options`)."""

    stages: tuple[str, ...] = config.STAGES
    steps: int = 3
    warmup: int = 2
    max_batch: int = 256
    memory_cap_mib: float = 16 * 1024.0
    time_budget_s: float = 120.0
    precision: str | None = None  # None = each stage's trainer.precision
    scans: int = 10000
    devices: int = 1


@dataclass
class BenchOptions:
    """Settings of one benchmark run (defaults from ``configs/bench.yaml``, see :func:`options_from_config`)."""

    preset: str
    steps: int
    repeats: int
    warmup: int
    device: str
    threads: int
    seed: int
    gemm_size: int
    gemm_repeats: int
    compile_timeout_s: float
    paper_claim: dict
    recommend: dict
    skip: tuple[str, ...] = ()
    train: TrainOptions | None = None  # None: no training section (``--train`` not given)

    def sections(self) -> list[str]:
        """The sections this run measures, in order."""
        return [s for s in SECTIONS if s not in self.skip and (s != "train" or self.train is not None)]


def bench_config() -> dict:
    """The packaged ``configs/bench.yaml`` (the one place the benchmark's settings file is read), through the
    one settings loader (:func:`ldae.config.load_settings`)."""
    return load_settings(configs_root() / "bench.yaml")


def _positive_int(value: Any, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"bench setting '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _positive_float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"bench setting '{key}' must be a number > 0, got {value!r}")
    return float(value)


def train_options(cfg: dict, **overrides: Any) -> TrainOptions:
    """The ``train`` section of ``bench.yaml`` with non-None ``overrides`` (``precision``, ``scans``,
    ``devices``, ``memory_cap_gib``, ``max_batch``, ``stages``, ``time_budget_s``, ``steps``, ``warmup``),
    validated."""
    tcfg = dict(cfg.get("train") or {})
    ov = {k: v for k, v in overrides.items() if v is not None}
    stages = tuple(ov.get("stages", tcfg.get("stages", TrainOptions.stages)))
    unknown = [s for s in stages if s not in TRAIN_STAGES]
    if unknown or not stages:
        raise ConfigError(f"bench setting 'train.stages': unknown stage(s) {', '.join(unknown) or '(none given)'} "
                          f"(stages: {', '.join(TRAIN_STAGES)})")
    precision = ov.get("precision", tcfg.get("precision", "preset"))
    if precision not in (*PRECISIONS, "preset"):
        raise ConfigError(f"bench setting 'train.precision' is {precision!r} (choose preset, {', '.join(PRECISIONS)})")
    return TrainOptions(
        stages=stages,
        steps=_positive_int(ov.get("steps", tcfg.get("steps", TrainOptions.steps)), "train.steps"),
        warmup=_positive_int(ov.get("warmup", tcfg.get("warmup", TrainOptions.warmup)), "train.warmup", 0),
        max_batch=_positive_int(ov.get("max_batch", tcfg.get("max_batch", TrainOptions.max_batch)), "train.max_batch"),
        memory_cap_mib=1024.0 * _positive_float(ov.get("memory_cap_gib", tcfg.get("cpu_memory_cap_gib", 16)),
                                                "train.cpu_memory_cap_gib"),
        time_budget_s=_positive_float(ov.get("time_budget_s", tcfg.get("time_budget_s", TrainOptions.time_budget_s)),
                                      "train.time_budget_s"),
        precision=None if precision == "preset" else str(precision),
        scans=_positive_int(ov.get("scans", tcfg.get("scans", TrainOptions.scans)), "train.scans"),
        devices=_positive_int(ov.get("devices", tcfg.get("devices", 1)), "train.devices"),
    )


def options_from_config(cfg: dict, train: bool = False, train_overrides: dict | None = None,
                        **overrides: Any) -> BenchOptions:
    """Merge ``configs/bench.yaml`` values with non-None ``overrides`` (the command-line flags) and validate.
    ``train`` adds the training-step section, with ``train_overrides`` for :func:`train_options`."""
    ov = {k: v for k, v in overrides.items() if v is not None}
    preset = ov.get("preset", cfg["preset"])
    steps_cfg = cfg.get("steps", {})
    steps = ov.get("steps", steps_cfg.get(preset) if isinstance(steps_cfg, dict) else steps_cfg)
    if steps is None:
        raise ConfigError(f"bench setting 'steps.{preset}' is not set in configs/bench.yaml: pass --steps N")
    threads = ov.get("threads", cfg.get("threads"))
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    skip = tuple(ov.get("skip", ()))
    if not cfg.get("compile", {}).get("enabled", True) and "compile" not in skip:
        skip += ("compile",)
    unknown = [s for s in skip if s not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown bench section(s) {', '.join(unknown)} (sections: {', '.join(SECTIONS)})")
    timeout = float(ov.get("compile_timeout_s", cfg["compile"]["timeout_s"]))
    if timeout <= 0:
        raise ConfigError(f"bench setting 'compile.timeout_s' must be > 0, got {timeout}")
    return BenchOptions(
        preset=str(preset),
        steps=_positive_int(steps, "steps"),
        repeats=_positive_int(ov.get("repeats", cfg["repeats"]), "repeats"),
        warmup=_positive_int(ov.get("warmup", cfg["warmup"]), "warmup", 0),
        device=str(ov.get("device", cfg["device"])),
        threads=_positive_int(threads, "threads"),
        seed=int(ov.get("seed", cfg.get("seed", 0))),
        gemm_size=_positive_int(cfg["gemm"]["size"], "gemm.size"),
        gemm_repeats=_positive_int(cfg["gemm"]["repeats"], "gemm.repeats"),
        compile_timeout_s=timeout,
        paper_claim=dict(cfg["paper_claim"]),
        recommend=dict(cfg["recommend"]),
        skip=skip,
        train=train_options(cfg, **(train_overrides or {})) if train else None,
    )


@dataclass
class PresetConfigs:
    """The stage configs of a preset whose networks the bench builds."""

    preset: str
    stages: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, preset: str) -> PresetConfigs:
        out = cls(preset, {stage: load_preset(preset, stage) for stage in STAGES})
        out.check()
        return out

    def __getitem__(self, stage: str) -> dict:
        return self.stages[stage]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self["autoencoder"]["data"]["shape"])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        from ldae.nets.autoencoder import latent_shape

        return latent_shape(self["autoencoder"]["model"], list(self.image_shape))

    @property
    def emb_dim(self) -> int:
        return int(self["representation"]["model"]["semantic_encoder"]["emb_dim"])

    def check(self) -> None:
        """ConfigError unless LDAE and the voxel DAE work on the same image grid (equal-footing comparison)."""
        vox = tuple(int(s) for s in self["voxel_dae"]["data"]["shape"])
        if vox != self.image_shape:
            raise ConfigError(f"preset '{self.preset}': voxel_dae data.shape {list(vox)} differs from autoencoder "
                              f"data.shape {list(self.image_shape)}; the comparison needs the same image grid")
        slices = self["representation"]["model"]["semantic_encoder"]["num_slices"]
        if slices != self.image_shape[-1]:
            raise ConfigError(f"preset '{self.preset}': representation model.semantic_encoder.num_slices is "
                              f"{slices} but the images have {self.image_shape[-1]} axial slices")
