"""``ldae bench --train``: what one training step of each stage costs on this device, how large a batch fits,
and what the preset's whole schedule would take on a cohort of N scans.

What is timed. The stages' own LightningModules (randomly initialised networks of the preset) run
``Trainer.fit`` on a fixed in-memory batch already on the device, so the timed code is the trained code:
``training_step`` (forward + loss), backward, the optimiser step (gradient clipping as configured), the EMA
update (``EMAStepMixin.optimizer_step``) and, for the autoencoder, the discriminator's own backward and step
(the adversary is switched on from the first step, as after its warm-up epochs). A step is the wall time from
Lightning's ``on_train_batch_start`` to ``on_train_batch_end`` (device-synchronised), so data loading and the
host-to-device copy are not included; the first ``warmup`` steps (allocations, cuDNN autotuning, Adam's state)
are not timed; the median of ``steps`` timed steps is reported. Each step is a full optimiser step
(accumulation 1). Validation, figures and checkpoint writing are not included.

Batch sizes 1, 2, 4, … are measured until the device runs out of memory (CUDA: ``torch.OutOfMemoryError`` is
caught, memory freed, the sweep stops), the measured peak exceeds ``train.cpu_memory_cap_gib`` (CPU; the next
batch is not started when its linear projection — per-sample memory from the last two batches — exceeds the
cap), ``train.max_batch`` is reached, or the next batch is projected (twice the last one's wall time) past the
stage's ``train.time_budget_s``. Peak memory counts everything the stage adds to the process (weights,
gradients, optimiser state, EMA copies, activations, workspace): CUDA ``max_memory_allocated`` (plus the
allocator's reserve) above the level before the stage's module was built, CPU the resident set's growth.

Projection (:func:`plan`). For K devices under DDP the assumption is linear scaling: every device runs the
measured step time at its micro-batch, gradient all-reduce and data loading are free. With the preset's
effective batch E (``data.batch_size`` × accumulation), a device takes micro-batch m = the largest measured
batch ≤ ⌈E / K⌉ that fits, accumulates a = ⌈E / (K·m)⌉ micro-batches per optimiser step, and an epoch over
n_train = N × (1 − test_fraction − val_fraction) scans takes ⌈n_train / (K·m)⌉ × t(m) (a micro-batch without an
optimiser step is counted at the full step time: a slight over-estimate); the schedule is
``trainer.max_epochs`` epochs.

:func:`time_training_step` is the one training-step timing core of the project (the per-stage step-time
benchmarks reuse it).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldae.errors import ConfigError, LDAEError, describe
from ldae.jobs.bench.measure import (
    PeakMemory,
    cuda_allocated_mib,
    free_memory,
    resident_mib,
    summary,
    synchronize,
)
from ldae.jobs.bench.options import PresetConfigs, TrainOptions

log = logging.getLogger(__name__)
Tensor = torch.Tensor

ASSUMPTION = ("DDP projection assumes linear scaling: each of K devices runs the measured step time at its "
              "micro-batch; gradient all-reduce, data loading and validation are not included")


# ----------------------------------------------------------------------------- the timing core


class _FixedBatches(torch.utils.data.Dataset):
    """``n`` times the same batch (a dict of tensors already on the device): no loading, no copying."""

    def __init__(self, batch: dict[str, Tensor], n: int) -> None:
        self.batch, self.n = batch, int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.batch


def _step_timer(device: torch.device) -> Any:
    """A Lightning callback recording the wall time of every training batch (device-synchronised)."""
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.runs: list[float] = []
            self.cpu_runs: list[float] = []  # process CPU time: robust to other jobs sharing the cores
            self._t0 = self._c0 = 0.0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            synchronize(device)
            self._t0, self._c0 = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            synchronize(device)
            self.runs.append(time.perf_counter() - self._t0)
            self.cpu_runs.append(time.process_time() - self._c0)

    return StepTimer()


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's start-up notices and data-loader advice off (the benchmark's loader is deliberate)."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
            warnings.filterwarnings("ignore", message=r".*validation_step.*")
            warnings.filterwarnings("ignore", message=r".*val_dataloader.*")
            warnings.filterwarnings("ignore", message=r".*log_every_n_steps.*")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # Lightning vs newer torch (pytree)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def lightning_device(device: torch.device) -> dict[str, Any]:
    """``Trainer`` arguments that put one process on ``device``."""
    if device.type == "cuda":
        return {"accelerator": "gpu", "devices": [device.index if device.index is not None else 0]}
    return {"accelerator": "cpu", "devices": 1}


def time_training_step(module: Any, batch: dict[str, Tensor], device: torch.device, *, precision: str = "32-true",
                       steps: int = 3, warmup: int = 1, trainer_kwargs: dict | None = None) -> dict:
    """Time ``steps`` optimiser steps of the LightningModule ``module`` on ``batch`` (after ``warmup`` untimed
    ones) through ``lightning.pytorch.Trainer.fit``: ``{'s': median, 'min_s', 'runs_s', 'cpu_s', 'cpu_min_s',
    'steps', 'warmup'}`` (``cpu_s``: median process CPU time of a step, all threads).

    The trainer runs one process on ``device`` at ``precision`` with no logger, checkpoints, progress bar or
    validation; ``trainer_kwargs`` adds Trainer arguments (e.g. ``gradient_clip_val``). Afterwards the module
    is detached from the trainer and its gradients dropped, so that it can be timed again at another batch
    size without carrying the optimiser state along. Exceptions (e.g. ``torch.OutOfMemoryError``) propagate.
    """
    import lightning.pytorch as pl

    timer = _step_timer(device)
    n = int(warmup) + int(steps)
    loader = torch.utils.data.DataLoader(_FixedBatches(batch, n), batch_size=None, shuffle=False, num_workers=0)
    with tempfile.TemporaryDirectory(prefix="ldae-bench-train-") as tmp, quiet_lightning():
        kwargs: dict[str, Any] = {
            # one epoch over the n batches (not max_steps: with two optimisers, as in the autoencoder's manual
            # optimisation, Lightning's global step counts optimiser steps, two per batch)
            **lightning_device(device), "precision": precision, "max_epochs": 1,
            "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
            "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 0,
            "default_root_dir": tmp, "callbacks": [timer],
        }
        kwargs.update(trainer_kwargs or {})
        trainer = pl.Trainer(**kwargs)
        try:
            trainer.fit(module, train_dataloaders=loader)
        finally:
            module.trainer = None  # the trainer holds the optimisers (and their state): let them go
            for p in module.parameters():
                p.grad = None
            del trainer
    runs = timer.runs[int(warmup):]
    if len(runs) < int(steps):
        raise RuntimeError(f"training ran {len(timer.runs)} of {n} steps")
    cpu = timer.cpu_runs[int(warmup):]
    return {**summary(runs), "cpu_s": statistics.median(cpu), "cpu_min_s": min(cpu), "steps": int(steps),
            "warmup": int(warmup)}


# ----------------------------------------------------------------------------- the stages


@dataclass
class StageSetup:
    """How to train one stage in memory: its (bench copy of the) config, a module factory, a batch factory."""

    stage: str
    cfg: dict
    build: Callable[[], Any]
    batch: Callable[[int], dict[str, Tensor]]
    trainer_kwargs: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def preset_schedule(self) -> dict:
        """The preset's batching and schedule: per-process batch, accumulation, effective batch, epochs and
        the fraction of a cohort that is trained on."""
        data, trainer = self.cfg["data"], self.cfg["trainer"]
        accumulate = (self.cfg["optim"].get("accumulate_grad_batches") if self.stage == "autoencoder"
                      else trainer.get("accumulate_grad_batches")) or 1
        batch = int(data["batch_size"])
        return {"batch_size": batch, "accumulate": int(accumulate), "effective_batch": batch * int(accumulate),
                "max_epochs": int(trainer.get("max_epochs") or 1),
                "train_fraction": 1.0 - float(data.get("test_fraction", 0.1)) - float(data.get("val_fraction", 0.01))}


def _bench_cfg(cfg: dict, out: Path) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["out"] = str(out)
    return cfg


def _clip_kwargs(cfg: dict) -> dict:
    """The preset's Lightning-side gradient clipping (automatic-optimisation stages)."""
    trainer = cfg.get("trainer", {})
    return {k: trainer[k] for k in ("gradient_clip_val", "gradient_clip_algorithm") if trainer.get(k) is not None}


def stage_setup(stage: str, cfgs: PresetConfigs, device: torch.device, out: Path, seed: int) -> StageSetup:
    """The :class:`StageSetup` of ``stage`` for the preset ``cfgs`` (random networks; nothing read from disk)."""
    image, latent = cfgs.image_shape, cfgs.latent_shape

    def images(b: int) -> Tensor:
        return torch.rand((b, 1, *image), generator=torch.Generator().manual_seed(seed)).to(device)

    def latents(b: int) -> Tensor:
        return torch.randn((b, *latent), generator=torch.Generator().manual_seed(seed + 1)).to(device)

    if stage == "autoencoder":
        from ldae.nets.perceptual import build_perceptual_loss
        from ldae.training.autoencoder import AutoencoderModule

        cfg = _bench_cfg(cfgs["autoencoder"], out)
        cfg["out"] = None  # no figures
        cfg["loss"]["adversarial_warmup_epochs"] = 0  # the adversary on from the first step
        cfg["optim"]["accumulate_grad_batches"] = 1
        perceptual = build_perceptual_loss(cfg["loss"])
        notes = ["generator + discriminator step (2 optimisers)" if float(cfg["loss"]["adversarial_weight"]) > 0
                 else "generator step (adversarial_weight 0: no discriminator step)",
                 f"perceptual loss {perceptual.status}"]
        return StageSetup(stage, cfgs["autoencoder"], lambda: AutoencoderModule(cfg, perceptual=perceptual.loss),
                          lambda b: {"image": images(b)}, {}, notes)
    if stage == "diffusion":
        from ldae.training.latent_diffusion import LatentDiffusionModule

        cfg = _bench_cfg(cfgs["diffusion"], out)
        return StageSetup(stage, cfgs["diffusion"],
                          lambda: LatentDiffusionModule(cfg, scale_factor=1.0, latent_shape=list(latent)),
                          lambda b: {"latent": latents(b)}, _clip_kwargs(cfg), ["UNet step + EMA update"])
    if stage == "representation":
        from ldae.training.representation import RepresentationModule

        cfg = _bench_cfg(cfgs["representation"], out)

        def build() -> Any:
            return RepresentationModule(cfg, str(out / "diffusion.ckpt"), diffusion=in_memory_diffusion(cfgs, out))

        return StageSetup(stage, cfgs["representation"], build,
                          lambda b: {"image": images(b), "latent": latents(b)}, _clip_kwargs(cfg),
                          ["semantic encoder + gradient estimator step on the frozen UNet, EMA updates"])
    if stage == "voxel_dae":
        from ldae.training.voxel_dae import VoxelDAEModule

        cfg = _bench_cfg(cfgs["voxel_dae"], out)
        return StageSetup(stage, cfgs["voxel_dae"], lambda: VoxelDAEModule(cfg), lambda b: {"image": images(b)},
                          _clip_kwargs(cfg), ["voxel-space encoder + UNet step, EMA update"])
    raise ConfigError(f"bench: no training benchmark for stage '{stage}'")


def in_memory_diffusion(cfgs: PresetConfigs, out: Path) -> Any:
    """A frozen random latent DDPM of the preset as the checkpoint loader would return it (for stage 3)."""
    from ldae.checkpoints import LatentDiffusion, StageMetadata
    from ldae.diffusion.schedule import NoiseSchedule
    from ldae.nets.unet import LatentUNet
    from ldae.nets.weights import freeze

    dcfg = cfgs["diffusion"]
    unet = freeze(LatentUNet.from_config(dcfg["model"]))
    return LatentDiffusion(unet=unet, schedule=NoiseSchedule.from_config(dcfg["diffusion"]), scale_factor=1.0,
                           latent_shape=tuple(cfgs.latent_shape), cfg=dcfg, checkpoint=out / "diffusion.ckpt",
                           meta=StageMetadata(stage="diffusion", config=dcfg, preset=cfgs.preset))


def stage_precision(setup: StageSetup, requested: str | None, device: torch.device) -> str:
    """``requested`` (``--precision``), else the stage's ``trainer.precision`` (bf16 falls back to 32-true on
    a GPU without bf16, as in training); ConfigError for a combination the device cannot run."""
    from ldae.training.common import resolve_precision

    if requested is None:
        precision = resolve_precision({**setup.cfg["trainer"], "accelerator": "gpu" if device.type == "cuda" else "cpu"})
    else:
        precision = requested
    if precision.startswith("16") and device.type != "cuda":
        raise ConfigError(f"--precision {precision}: fp16 mixed precision needs a CUDA device "
                          "(CPU autocast runs bf16: use bf16-mixed)")
    if precision.startswith("bf16") and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision {precision}: this GPU has no bf16 support (use 16-mixed or 32-true)")
    return precision


# ----------------------------------------------------------------------------- the batch sweep


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's ``OutOfMemoryError`` and the CPU allocator's failure to allocate."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def sweep_batches(measure: Callable[[int], dict], *, max_batch: int, memory_cap_mib: float | None,
                  time_budget_s: float, clock: Callable[[], float] = time.perf_counter) -> tuple[list[dict], dict]:
    """Measure batch sizes 1, 2, 4, … with ``measure(b)`` (a dict with ``status`` ``ok`` / ``oom`` /
    ``failed``, and for ``ok`` its ``peak_mib`` and ``wall_s``) until one does not fit or a limit is reached.

    Returns ``(rows, stop)``: one row per measured batch (a row over ``memory_cap_mib`` gets status
    ``over memory cap``) and ``{'reason', 'detail'}`` saying why the sweep stopped: ``out of memory``,
    ``memory cap`` (measured or projected), ``max_batch``, ``time budget`` or ``failed``.
    """
    rows: list[dict] = []
    start = clock()
    b = 1
    while True:
        ok = [r for r in rows if r["status"] == "ok"]
        if b > max_batch:
            return rows, {"reason": "max_batch", "detail": f"train.max_batch {max_batch} reached (memory left)"}
        if ok and memory_cap_mib is not None and ok[-1].get("peak_mib") is not None:
            last = ok[-1]["peak_mib"]
            prev = ok[-2]["peak_mib"] if len(ok) > 1 and ok[-2].get("peak_mib") is not None else None
            # per-sample memory from the last two batches (b/2 and b/4 samples apart); 2x when only one is known
            projected = last + 2.0 * (last - prev) if prev is not None else 2.0 * last
            if projected > memory_cap_mib:
                return rows, {"reason": "memory cap", "detail": f"batch {b} projected to {projected:.0f} MiB, over "
                              f"the {memory_cap_mib:.0f} MiB cap (train.cpu_memory_cap_gib)",
                              "projected_mib": projected}
        if ok:
            elapsed, projected_s = clock() - start, 2.0 * ok[-1]["wall_s"]
            if elapsed + projected_s > time_budget_s:
                return rows, {"reason": "time budget", "detail": f"batch {b} projected to take {projected_s:.0f} s "
                              f"more after {elapsed:.0f} s (train.time_budget_s {time_budget_s:g})"}
        row = measure(b)
        rows.append(row)
        if row["status"] == "oom":
            return rows, {"reason": "out of memory", "detail": f"batch {b}: {row.get('reason', '')}"}
        if row["status"] != "ok":
            return rows, {"reason": "failed", "detail": f"batch {b}: {row.get('reason', '')}"}
        if memory_cap_mib is not None and row.get("peak_mib") is not None and row["peak_mib"] > memory_cap_mib:
            row["status"] = "over memory cap"
            return rows, {"reason": "memory cap", "detail": f"batch {b} used {row['peak_mib']:.0f} MiB, over the "
                          f"{memory_cap_mib:.0f} MiB cap (train.cpu_memory_cap_gib)"}
        b *= 2


def measure_stage(setup: StageSetup, device: torch.device, precision: str, topts: TrainOptions) -> dict:
    """Build the stage's module once, sweep the batch sizes, and summarise (see the module docstring)."""
    import lightning.pytorch  # noqa: F401 - imported before the baseline, so that it does not count

    free_memory(device)
    base = cuda_allocated_mib(device) if device.type == "cuda" else resident_mib()
    with quiet_lightning():
        module = setup.build()
    params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    unet = getattr(module, "_ldm", None)
    if unet:  # the representation stage keeps its frozen UNet outside its children
        frozen += sum(p.numel() for p in unet[0].unet.parameters())

    def measure(b: int) -> dict:
        t0 = time.perf_counter()
        failure: tuple[str, str] | None = None
        try:
            with PeakMemory(device, base_mib=base) as peak:
                timing = time_training_step(module, setup.batch(b), device, precision=precision,
                                            steps=topts.steps, warmup=topts.warmup,
                                            trainer_kwargs=setup.trainer_kwargs)
        except LDAEError:
            raise
        except Exception as exc:  # noqa: BLE001 - the sweep reports it and stops
            oom = is_out_of_memory(exc)
            failure = ("oom" if oom else "failed", describe(exc) if oom else f"{type(exc).__name__}: {describe(exc)}")
        if failure is not None:  # outside the except block: the traceback (and the tensors it holds) is gone
            free_memory(device)
            if failure[0] == "failed":
                log.warning("bench --train: %s at batch %d failed: %s", setup.stage, b, failure[1])
            return {"batch": b, "status": failure[0], "reason": failure[1], "wall_s": time.perf_counter() - t0}
        row = {"batch": b, "status": "ok", **timing, "samples_per_s": b / timing["s"], "peak_mib": peak.peak_mib,
               "wall_s": time.perf_counter() - t0}
        if peak.reserved_mib is not None:
            row["reserved_mib"] = peak.reserved_mib
        if peak.reason:
            row["peak_note"] = peak.reason
        log.info("bench --train: %s batch %d: %.3f s/step, peak %s MiB", setup.stage, b, timing["s"],
                 "-" if peak.peak_mib is None else f"{peak.peak_mib:.0f}")
        return row

    cap = topts.memory_cap_mib if device.type == "cpu" else None
    rows, stop = sweep_batches(measure, max_batch=topts.max_batch, memory_cap_mib=cap,
                               time_budget_s=topts.time_budget_s)
    module = None  # noqa: F841 - the stage's networks go before the next stage is built
    free_memory(device)
    fits = [r for r in rows if r["status"] == "ok"]
    best = max(fits, key=lambda r: r["samples_per_s"]) if fits else None
    return {"precision": precision, "trainable_params": params, "frozen_params": frozen,
            "input_shapes": {k: list(v.shape[1:]) for k, v in setup.batch(1).items()},
            "notes": setup.notes, "batches": rows, "stop": stop,
            "largest_batch": fits[-1]["batch"] if fits else None,
            "best_samples_per_s": best["samples_per_s"] if best else None,
            "best_batch": best["batch"] if best else None,
            "preset": setup.preset_schedule()}


# ----------------------------------------------------------------------------- projections


def plan(rows: list[dict], preset: dict, scans: int, devices: int) -> dict | None:
    """The preset's schedule on ``devices`` devices from the measured ``rows`` (see the module docstring);
    None when not even batch 1 fits."""
    fits = {r["batch"]: r for r in rows if r["status"] == "ok"}
    if not fits:
        return None
    effective = int(preset["effective_batch"])
    share = max(1, math.ceil(effective / devices))
    candidates = [b for b in fits if b <= share]
    micro = max(candidates) if candidates else min(fits)
    accumulate = max(1, math.ceil(effective / (devices * micro)))
    step_s = fits[micro]["s"]
    n_train = max(1, round(scans * float(preset["train_fraction"])))
    micro_steps = math.ceil(n_train / (devices * micro))  # per device and epoch
    epoch_s = micro_steps * step_s
    return {"devices": devices, "micro_batch": micro, "accumulate": accumulate,
            "effective_batch": devices * micro * accumulate, "preset_effective_batch": effective,
            "step_s": step_s, "samples_per_s_per_device": micro / step_s, "samples_per_s": devices * micro / step_s,
            "train_scans": n_train, "micro_steps_per_epoch": micro_steps, "optimizer_steps_per_epoch":
            math.ceil(micro_steps / accumulate), "epoch_s": epoch_s, "max_epochs": int(preset["max_epochs"]),
            "schedule_s": epoch_s * int(preset["max_epochs"])}


def bench_train(cfgs: PresetConfigs, topts: TrainOptions, device: torch.device, seed: int) -> dict:
    """The ``train`` section: every stage of ``topts.stages`` measured and projected."""
    out: dict[str, Any] = {"scans": topts.scans, "devices": topts.devices, "assumption": ASSUMPTION,
                           "steps": topts.steps, "warmup": topts.warmup, "max_batch": topts.max_batch,
                           "memory_cap_mib": topts.memory_cap_mib if device.type == "cpu" else None,
                           "time_budget_s": topts.time_budget_s, "stages": {}}
    setups = {}
    with tempfile.TemporaryDirectory(prefix="ldae-bench-train-") as tmp:
        for stage in topts.stages:  # settings errors first, before anything is measured
            setups[stage] = stage_setup(stage, cfgs, device, Path(tmp) / stage, seed)
        precisions = {stage: stage_precision(setups[stage], topts.precision, device) for stage in topts.stages}
        for stage, setup in setups.items():
            log.info("bench: training step of stage %s (%s)", stage, precisions[stage])
            torch.manual_seed(seed)
            res = measure_stage(setup, device, precisions[stage], topts)
            res["plans"] = {str(k): plan(res["batches"], res["preset"], topts.scans, k)
                            for k in sorted({1, topts.devices})}
            out["stages"][stage] = res
    for k in sorted({1, topts.devices}):
        plans = [s["plans"][str(k)] for s in out["stages"].values()]
        out.setdefault("schedule_s", {})[str(k)] = (sum(p["schedule_s"] for p in plans)
                                                    if plans and all(p is not None for p in plans) else None)
    return out
