"""What every training stage shares: run folders, resolved configs, trainers, checkpoints.

Layout of a stage run folder ``cfg['out']``::

    config.yaml            fully resolved config (written before training starts)
    checkpoints/best.ckpt  best by the stage's validation metric
    checkpoints/last.ckpt  latest (resume point)
    logs/metrics.csv       Lightning CSV logger
    logs/events.out.tfevents.*  the same metrics (and the figures) for TensorBoard (``logging.tensorboard``)
    figures/               PNG mosaics written during validation

Checkpoints carry the stage's :class:`ldae.checkpoints.StageMetadata` (stage, preset, resolved config and
stage-specific facts), written by each module's ``on_save_checkpoint`` through
:func:`ldae.checkpoints.attach_metadata`, so that loading a checkpoint into the wrong stage fails with a
clear message.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ldae.config import save_config
from ldae.errors import CheckpointError, ConfigError
from ldae.io import atomic_path

log = logging.getLogger(__name__)

def run_dir(cfg: dict) -> Path:
    """The run folder named by ``cfg['out']`` (required)."""
    out = cfg.get("out")
    if not out:
        raise ConfigError("config key 'out' (the run folder) is not set: pass --out DIR")
    return Path(out)


def prepare_run(cfg: dict, resume: bool = False) -> tuple[Path, Path | None]:
    """Check the run folder; return ``(run_dir, checkpoint to resume or None)``. Writes nothing: the folder,
    its lock and ``config.yaml`` are made by :func:`start_run` once the model is built and, on resume,
    checked against the checkpoint (so a refused config leaves nothing behind).

    A folder that already holds a ``last.ckpt`` is only reused with ``resume=True`` (never silently
    overwritten); an ``out`` that is an existing file or cannot be created is refused up front.
    """
    from ldae.io import check_output_folder

    out = check_output_folder(run_dir(cfg))
    last = out / "checkpoints" / "last.ckpt"
    if last.is_file() and not resume:
        raise ConfigError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    resume_ckpt = last if resume and last.is_file() else None
    return out, resume_ckpt


def check_resume(module: Any, cfg: dict, resume_ckpt: Path) -> None:
    """ConfigError (before anything is written) when ``cfg``/``module`` cannot continue ``resume_ckpt``: a
    weight whose shape differs, a weight the checkpoint has that the model lacks, or another model grid
    (``data.spacing``/``data.shape``: same weights, different meaning)."""
    from ldae.checkpoints import load_checkpoint

    ckpt = load_checkpoint(resume_ckpt)
    saved = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{resume_ckpt}: not a training checkpoint (no state_dict) to resume from")
    hint = f"resume with the run's own config ({resume_ckpt.parents[1] / 'config.yaml'}) or choose another --out"
    old_cfg = (ckpt.get("ldae") or {}).get("config") if isinstance(ckpt.get("ldae"), dict) else None
    if isinstance(old_cfg, dict):
        for key in ("spacing", "shape"):
            before, now = (old_cfg.get("data") or {}).get(key), (cfg.get("data") or {}).get(key)
            if before is not None and now is not None and before != now:
                raise ConfigError(f"{resume_ckpt}: --resume with data.{key} {now} but the run was trained with "
                                  f"{before}; {hint}")
    current = module.state_dict()
    wrong = [(k, tuple(v.shape), tuple(current[k].shape)) for k, v in saved.items()
             if hasattr(v, "shape") and k in current and tuple(v.shape) != tuple(current[k].shape)]
    if wrong:
        key, before, now = wrong[0]
        raise ConfigError(f"{resume_ckpt}: --resume with a config that changes the model: '{key}' has shape "
                          f"{list(before)} in the checkpoint, {list(now)} now ({len(wrong)} weight(s) differ); {hint}")
    extra = [k for k in saved if k not in current]
    if extra:
        raise ConfigError(f"{resume_ckpt}: --resume with a config that changes the model: the checkpoint has "
                          f"'{extra[0]}' ({len(extra)} weight(s)) that this model lacks; {hint}")


def start_run(cfg: dict, out: Path, resume_ckpt: Path | None) -> Any:
    """Create the run folder, lock it (:class:`ldae.runs.RunLock`: one writer per folder) and save the
    resolved config; a fresh run drops the log of an attempt that died before its first checkpoint.
    Returns the held lock (released by :func:`train`)."""
    from ldae.runs import RunLock

    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out, f"training stage {cfg.get('stage')}").acquire()
    try:
        save_config(cfg, out / "config.yaml")
        if resume_ckpt is None:
            (out / "logs" / "metrics.csv").unlink(missing_ok=True)
    except BaseException:
        lock.release()
        raise
    return lock


def make_checkpoint_io():
    """Lightning CheckpointIO that writes to a temporary file and renames (no half-written .ckpt)."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            with atomic_path(path, suffix=".tmp") as tmp:
                torch.save(checkpoint, tmp)

    return AtomicCheckpointIO()


def make_csv_logger(out: Path):
    """Lightning's CSVLogger for ``out/logs/metrics.csv``, except that it appends to an existing file (a
    resumed run keeps its history; Lightning's own deletes it) and rewrites it atomically when new
    columns appear."""
    import csv

    from lightning.fabric.loggers.logger import rank_zero_experiment
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class AppendingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:  # Lightning deletes metrics.csv here
            path = Path(self.metrics_file_path)
            if path.is_file():
                with path.open(newline="") as fh:
                    self.metrics_keys = next(csv.reader(fh), [])

        def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
            with open(self.metrics_file_path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            with atomic_path(self.metrics_file_path) as tmp:
                with tmp.open("w", newline="") as fh:
                    writer = csv.DictWriter(fh, fieldnames=fieldnames)
                    writer.writeheader()
                    writer.writerows(rows)

    class AppendingCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self) -> AppendingWriter:
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = AppendingWriter(log_dir=self.log_dir)
            return self._experiment

    return AppendingCSVLogger(str(out), name="logs", version="")


def tensorboard_enabled(cfg: dict) -> bool:
    """Whether a stage writes TensorBoard event files: the config's ``logging.tensorboard`` — ``auto`` (the
    default: when the ``tensorboard`` package is installed), ``true`` (ConfigError without it) or ``false``."""
    import importlib.util

    from ldae.config import get_dotted

    setting = get_dotted(cfg, "logging.tensorboard", "auto")
    if setting not in (True, False, "auto"):
        raise ConfigError(f"config key 'logging.tensorboard' must be auto, true or false, got {setting!r}")
    installed = importlib.util.find_spec("tensorboard") is not None
    if setting is True and not installed:
        raise ConfigError("config key 'logging.tensorboard' is true but the tensorboard package is not installed "
                          "(pip install tensorboard, or set logging.tensorboard auto/false)")
    return bool(setting is True or (setting == "auto" and installed))


def make_loggers(cfg: dict, out: Path) -> list:
    """The stage's loggers: ``out/logs/metrics.csv`` (:func:`make_csv_logger`) and, when
    :func:`tensorboard_enabled`, TensorBoard event files in the same folder (``tensorboard --logdir RUN``
    then shows every stage of a run side by side)."""
    loggers = [make_csv_logger(out)]
    if tensorboard_enabled(cfg):
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(out), name="logs", version="", default_hp_metric=False))
    return loggers


def figure_logger():
    """A Lightning callback that adds every new PNG in the run's ``figures/`` folder (the validation mosaics
    and samples the stages save) to the TensorBoard logger as an image, tagged by its name without the
    ``_epochNNN`` suffix and stepped by the global step. Figures that existed before the fit started (a
    resumed run) are not added again."""
    import re

    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger

    class FigureLogger(Callback):
        def __init__(self) -> None:
            self.seen: set[str] = set()

        @staticmethod
        def _figures(trainer: Any) -> list[Path]:
            folder = Path(trainer.default_root_dir) / "figures"
            return sorted(folder.glob("*.png")) if folder.is_dir() else []

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self.seen = {p.name for p in self._figures(trainer)}

        def _add_new(self, trainer: Any) -> None:
            writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
            if not writers or not trainer.is_global_zero:
                return
            import matplotlib.image as mpimg
            import numpy as np

            for path in self._figures(trainer):
                if path.name in self.seen:
                    continue
                self.seen.add(path.name)
                image = mpimg.imread(path)  # float in [0, 1], H x W x (3|4)
                rgb = (np.clip(image[..., :3], 0.0, 1.0) * 255).astype(np.uint8)
                tag = "figures/" + re.sub(r"_epoch\d+$", "", path.stem)
                for writer in writers:
                    writer.add_image(tag, rgb, global_step=trainer.global_step, dataformats="HWC")

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            self._add_new(trainer)

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            self._add_new(trainer)

    return FigureLogger()


def make_trainer(
    cfg: dict,
    out: Path,
    monitor: str | None,
    mode: str = "max",
    callbacks: list | None = None,
    **overrides: Any,
):
    """A Lightning Trainer from ``cfg['trainer']``, checkpointing best (by ``monitor``) and last."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    tcfg = dict(cfg.get("trainer", {}))
    best = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="best",
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        enable_version_counter=False,
    )
    # A separate unmonitored callback: Lightning's own ``save_last`` only rewrites last.ckpt when a top-k
    # checkpoint was saved at that step, so the resume point would lag behind every non-improving epoch.
    last = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="last",
        monitor=None,
        save_top_k=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    loggers = make_loggers(cfg, out)
    figures = [figure_logger()] if len(loggers) > 1 else []  # only TensorBoard shows images
    kwargs: dict[str, Any] = {
        "default_root_dir": str(out),
        "logger": loggers,
        "callbacks": [best, last, *figures, *(callbacks or [])],
        "plugins": [make_checkpoint_io()],
        "enable_model_summary": False,
    }
    kwargs.update(tcfg)
    kwargs.update(overrides)
    if kwargs.get("precision") in ("bf16-mixed", "16-mixed") and kwargs.get("accelerator") == "cpu":
        pass  # bf16 autocast works on CPU; 16-mixed does not, left to Lightning to refuse
    return pl.Trainer(**kwargs)


def cpu_bf16_native() -> bool:
    """Whether oneDNN runs bf16 convolutions/matmuls on this CPU with native instructions (AVX-512 BW/VL/DQ,
    AVX2-VNNI-2 or AMX, as PyTorch's ``mkldnn_bf16_device_check``) and no ``ONEDNN_MAX_CPU_ISA`` cap below
    AVX-512. Without them bf16 is emulated: on a 2-core AVX2 EPYC a bf16-autocast training step of the tiny
    latent DDPM took 11x as long as the fp32 one (12.4 s vs 1.1 s, one thread; issue 19)."""
    import os

    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper()
    if cap not in ("", "ALL", "DEFAULT") and not any(w in cap for w in ("AVX512", "AVX10", "AMX", "AVX2_VNNI_2")):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def resolve_precision(trainer_cfg: dict) -> str:
    """``trainer.precision``, with bf16 replaced by 32-true on a CUDA device without bf16 support, and on a
    CPU run (``accelerator`` cpu, or auto without CUDA) whose CPU has no native bf16 (:func:`cpu_bf16_native`)."""
    precision = str(trainer_cfg.get("precision", "32-true"))
    accel = str(trainer_cfg.get("accelerator", "auto"))
    if precision.startswith("bf16") and accel in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported():
            log.warning("this GPU has no bf16 support: training in 32-true precision")
            return "32-true"
    elif precision.startswith("bf16") and (accel == "cpu" or (accel == "auto" and not torch.cuda.is_available())):
        if not cpu_bf16_native():
            log.warning("this CPU has no native bf16 (no AVX-512/AMX: bf16 would be emulated, slower than fp32): "
                        "training in 32-true precision")
            return "32-true"
    return precision


def require_sections(cfg: dict, sections: tuple[str, ...], stage: str, csv_hint: str = "COHORT.csv") -> None:
    """ConfigError for the first of ``sections`` that is not a mapping, or for an unset ``data.csv``."""
    from ldae.config import get_dotted

    for section in sections:
        if not isinstance(cfg.get(section), dict):
            raise ConfigError(f"config section '{section}' is missing (stage '{stage}')")
    if not get_dotted(cfg, "data.csv"):
        raise ConfigError(f"config key 'data.csv' is not set: pass --data.csv {csv_hint}")


def check_ema_decay(cfg: dict) -> None:
    """ConfigError unless ``ema.decay`` is a number in [0, 1)."""
    decay = cfg["ema"].get("decay")
    if not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ConfigError(f"config key 'ema.decay' must be in [0, 1), got {decay!r}")


def make_datamodule(cls: type, cfg: dict, splits: tuple[str, ...] = ("train", "val"), **geometry: Any) -> Any:
    """``cls(cfg['data']['csv'], **geometry, ...)`` with the batching, label and split settings every stage
    reads from ``cfg['data']``; ConfigError when one of ``splits`` is empty."""
    data = cfg["data"]
    dm = cls(
        data["csv"], **geometry, batch_size=int(data["batch_size"]), eval_batch_size=data.get("eval_batch_size"),
        num_workers=int(data.get("num_workers", 0)), labels=data.get("labels", ("CN", "MCI", "AD")),
        seed=int(cfg.get("seed", 0)), test_fraction=float(data.get("test_fraction", 0.1)),
        val_fraction=float(data.get("val_fraction", 0.01)),
    )
    for split in splits:
        if dm.rows(split).empty:
            raise ConfigError(f"{data['csv']}: the '{split}' split is empty (check the CSV's split column "
                              "or data.val_fraction)")
    return dm


def train(module: Any, datamodule: Any, cfg: dict, out: Path, resume_ckpt: Path | None, monitor: str,
          mode: str) -> Path:
    """``Trainer.fit`` of a stage (resuming from ``resume_ckpt``); return its ``best.ckpt``, CheckpointError
    when training ended before any validation run wrote one."""
    import warnings

    if resume_ckpt is not None:
        check_resume(module, cfg, resume_ckpt)
    lock = start_run(cfg, out, resume_ckpt)
    try:
        trainer = make_trainer(cfg, out, monitor=monitor, mode=mode)
        with warnings.catch_warnings():  # EMA copies and frozen networks are in eval mode on purpose
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
            finally:  # under DDP, tear the process group down at exit (a no-op for a single process)
                import atexit

                from ldae.distributed import destroy_process_group

                atexit.register(destroy_process_group)
    finally:
        lock.release()
    best = out / "checkpoints" / "best.ckpt"
    if not best.is_file():
        raise CheckpointError(f"{out}: training ended without a validation run, so no best.ckpt was written "
                              "(raise trainer.max_epochs or lower trainer.check_val_every_n_epoch)")
    return best
