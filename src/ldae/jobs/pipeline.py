"""The whole method, chained: stage 1 -> compress -> stage 2 -> stage 3 -> evaluation.

Each stage's best checkpoint is handed to the next automatically. A stage that finished (``done.json``
in its folder) is skipped; one that was interrupted resumes from its ``last.ckpt``. Overrides are
prefixed by the stage they apply to, e.g. ``--autoencoder.trainer.max_epochs 3``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ldae.config import BASELINES, STAGES, apply_overrides, load_preset, parse_overrides
from ldae.errors import ConfigError
from ldae.io import write_json
from ldae.runs import COMPRESSED_CSV, stage_dir

log = logging.getLogger(__name__)

PIPELINE_STEPS = (STAGES[0], "compress", *STAGES[1:], *BASELINES, "evaluation")
#: the baselines (paper tables 5 and 7) are optional steps: they cost more than the method itself on a CPU
DEFAULT_STEPS = tuple(step for step in PIPELINE_STEPS if step not in BASELINES)
DONE = "done.json"


def split_overrides(overrides: Sequence[str]) -> dict[str, list[tuple[str, Any]]]:
    """``['--autoencoder.trainer.max_epochs', '3']`` -> ``{'autoencoder': [('trainer.max_epochs', 3)]}``."""
    out: dict[str, list[tuple[str, Any]]] = {}
    for key, value in parse_overrides(list(overrides)):
        step, _, rest = key.partition(".")
        if step not in PIPELINE_STEPS or not rest:
            raise ConfigError(
                f"pipeline override '--{key}' must start with a step name ({', '.join(PIPELINE_STEPS)})"
            )
        out.setdefault(step, []).append((rest, value))
    return out


def _is_done(folder: Path) -> bool:
    return (folder / DONE).is_file()


def _mark_done(folder: Path, info: dict) -> None:
    write_json(folder / DONE, info)


def _stage_cfg(preset: str, stage: str, out: Path, csv: Path, overrides: dict) -> dict:
    cfg = load_preset(preset, stage, overrides.get(stage, []))
    cfg["out"] = str(stage_dir(out, stage))
    cfg.setdefault("data", {})["csv"] = str(csv)
    return cfg


def run_pipeline(
    preset: str,
    csv: str | Path,
    out: str | Path,
    overrides: Sequence[str] = (),
    steps: Sequence[str] = DEFAULT_STEPS,
    on_step: Callable[[str, str], None] | None = None,
) -> dict[str, float]:
    """Run (or resume) the pipeline; return seconds spent per step in this call (0 for skipped ones)."""
    from ldae.jobs.compress import compress
    from ldae.training import fit

    out = Path(out)
    csv = Path(csv).resolve()
    per_step = split_overrides(overrides)
    unknown = [s for s in steps if s not in PIPELINE_STEPS]
    if unknown:
        raise ConfigError(f"unknown pipeline step(s): {', '.join(unknown)}")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    latents_csv = stage_dir(out, "latents") / COMPRESSED_CSV

    def _notify(step: str, state: str) -> None:
        log.info("pipeline: %s %s", step, state)
        if on_step is not None:
            on_step(step, state)

    for step in PIPELINE_STEPS:
        if step not in steps:
            continue
        folder = stage_dir(out, "latents" if step == "compress" else step)
        if _is_done(folder):
            _notify(step, "already done, skipped")
            timings[step] = 0.0
            continue
        _notify(step, "started")
        start = time.perf_counter()
        info: dict[str, Any] = {}
        if step == "autoencoder":
            cfg = _stage_cfg(preset, step, out, csv, per_step)
            info["best"] = str(fit(cfg, resume=(folder / "checkpoints" / "last.ckpt").is_file()))
        elif step == "compress":
            kwargs = dict(per_step.get("compress", []))
            ae = _best(out, "autoencoder")
            info["csv"] = str(compress(ae, csv, folder, **kwargs))
        elif step in ("diffusion", "representation"):
            cfg = _stage_cfg(preset, step, out, latents_csv, per_step)
            if step == "representation":
                cfg["diffusion_checkpoint"] = str(_best(out, "diffusion"))
            info["best"] = str(fit(cfg, resume=(folder / "checkpoints" / "last.ckpt").is_file()))
        elif step in ("voxel_dae", "supervised"):  # baselines train on the images, like stage 1
            cfg = _stage_cfg(preset, step, out, csv, per_step)
            info["best"] = str(fit(cfg, resume=(folder / "checkpoints" / "last.ckpt").is_file()))
        elif step == "evaluation":
            from ldae.evaluation.evaluate import evaluate

            cfg = load_preset(preset, "evaluation")
            info["metrics"] = str(evaluate(out, latents_csv, folder, cfg=cfg, overrides=per_step.get("evaluation", [])))
        seconds = time.perf_counter() - start
        info["seconds"] = seconds
        _mark_done(folder, info)
        timings[step] = seconds
        _notify(step, f"done in {seconds:.0f} s")
    return timings


def _best(out: Path, stage: str) -> Path:
    from ldae.runs import find_checkpoint

    return find_checkpoint(out, stage)
