"""The whole method, chained: stage 1 -> compress -> stage 2 -> stage 3 -> evaluation.

Each stage's best checkpoint is handed to the next automatically. A stage that finished (``done.json``
in its folder) is skipped; one that was interrupted resumes from its ``last.ckpt``. Overrides are
prefixed by the stage they apply to, e.g. ``--autoencoder.trainer.max_epochs 3``.

Reruns are guarded: ``RUN/inputs.json`` records what the run was made from (preset, the cohort CSV's
SHA-256, the overrides, each stage's resolved config); a rerun with another CSV, preset or overrides stops
with one line saying what differs, unless ``restart=True`` (``--restart``) clears the run's stage folders
and starts over. ``RUN/ldae.lock`` (:class:`ldae.runs.RunLock`) keeps a second pipeline out of a folder
that one is writing. Every config and override is validated before the run folder is created.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ldae.config import BASELINES, STAGES, apply_overrides, load_preset, parse_overrides
from ldae.errors import ConfigError
from ldae.io import check_output_folder, write_json
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


def _compress_kwargs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``--compress.KEY VALUE`` overrides as keyword arguments of :func:`ldae.jobs.compress.compress`,
    checked against its signature (name, and the type of its default) like any config override."""
    import inspect

    from ldae.config import check_value
    from ldae.jobs.compress import compress

    params = {n: p.default for n, p in inspect.signature(compress).parameters.items()
              if p.default is not inspect.Parameter.empty and n not in ("out_dir", "progress")}
    kwargs = {}
    for key, value in pairs:
        if key not in params:
            raise ConfigError(f"unknown pipeline override '--compress.{key}' (known: {', '.join(sorted(params))})")
        kwargs[key] = check_value(f"compress.{key}", params[key], value)
    return kwargs


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _comparable(cfg: dict) -> dict:
    """A stage config without the paths that legitimately change (run folder moved, CSV moved)."""
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.pop("out", None)
    cfg.pop("diffusion_checkpoint", None)
    if isinstance(cfg.get("data"), dict):
        cfg["data"].pop("csv", None)
    return cfg


def run_inputs(preset: str, csv: Path, per_step: dict, configs: dict[str, dict]) -> dict[str, Any]:
    """What a run is made from (``RUN/inputs.json``): preset, cohort CSV (path and SHA-256 of its bytes),
    the per-step overrides, and each step's resolved config (paths left out)."""
    return json_plain({
        "preset": preset,
        "csv": str(csv),
        "csv_sha256": file_sha256(csv),
        "overrides": {step: [[k, v] for k, v in pairs] for step, pairs in sorted(per_step.items())},
        "configs": {step: _comparable(cfg) for step, cfg in configs.items()},
    })


def _dotted_diffs(before: Any, now: Any, prefix: str = "") -> list[str]:
    """``key old -> new`` for every leaf that differs between two configs."""
    if isinstance(before, dict) and isinstance(now, dict):
        out = []
        for key in list(before) + [k for k in now if k not in before]:
            out += _dotted_diffs(before.get(key), now.get(key), f"{prefix}{key}.")
        return out
    return [] if before == now else [f"{prefix[:-1]} {before!r} -> {now!r}"]


def _differences(recorded: dict, now: dict) -> list[str]:
    """What differs between the recorded inputs of a run and this call's (steps run by only one of them
    are not compared: adding a baseline to a finished run is fine)."""
    diffs = []
    if recorded.get("preset") != now["preset"]:
        diffs.append(f"preset {recorded.get('preset')} -> {now['preset']}")
    if recorded.get("csv_sha256") != now["csv_sha256"]:
        diffs.append(f"cohort CSV {recorded.get('csv')} (sha256 {str(recorded.get('csv_sha256'))[:12]}) -> "
                     f"{now['csv']} (sha256 {now['csv_sha256'][:12]})")
    if recorded.get("preset") == now["preset"]:
        old_cfg = recorded.get("configs") or {}
        for step, cfg in now["configs"].items():
            if step in old_cfg:
                changed = _dotted_diffs(old_cfg[step], json_plain(cfg))
                if changed:
                    more = f" (+{len(changed) - 2} more)" if len(changed) > 2 else ""
                    diffs.append(f"{step}: {', '.join(changed[:2])}{more}")
    return diffs


def json_plain(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples -> lists), so recorded and new configs compare equal."""
    import json

    return json.loads(json.dumps(obj, default=str))


def _restart(out: Path) -> None:
    """Remove what the pipeline wrote into ``out`` (stage folders, inputs.json, timings.json)."""
    import shutil

    for step in PIPELINE_STEPS:
        folder = stage_dir(out, "latents" if step == "compress" else step)
        if folder.is_dir():
            shutil.rmtree(folder)
    for name in (INPUTS, "timings.json"):
        (out / name).unlink(missing_ok=True)


def run_pipeline(
    preset: str,
    csv: str | Path,
    out: str | Path,
    overrides: Sequence[str] = (),
    steps: Sequence[str] = DEFAULT_STEPS,
    on_step: Callable[[str, str], None] | None = None,
    restart: bool = False,
) -> dict[str, float]:
    """Run (or resume) the pipeline; return seconds per step (a step finished by an earlier call keeps the
    seconds it took then, from its ``done.json``).

    Raises ConfigError before anything is created for unknown steps or overrides, values of the wrong type,
    an ``out`` that is a file or not writable; LDAEError when ``out`` was made from other inputs (unless
    ``restart``) or another process is writing it."""
    from ldae.jobs.compress import compress
    from ldae.runs import RunLock
    from ldae.training import fit

    out = Path(out)
    csv = Path(csv).resolve()
    per_step = split_overrides(overrides)
    unknown = [s for s in steps if s not in PIPELINE_STEPS]
    if unknown:
        raise ConfigError(f"unknown pipeline step(s): {', '.join(unknown)}")
    check_output_folder(out)
    if csv.is_dir():
        raise ConfigError(f"{csv}: --csv is a folder, not a cohort CSV")
    if not csv.is_file():
        raise ConfigError(f"{csv}: cohort CSV not found")
    latents_csv = stage_dir(out, "latents") / COMPRESSED_CSV
    # every config resolved and checked before the run folder exists (a bad override leaves nothing behind)
    configs: dict[str, dict] = {}
    for step in PIPELINE_STEPS:
        if step not in steps and step not in per_step:
            continue
        if step in ("autoencoder", "voxel_dae", "supervised"):
            configs[step] = _stage_cfg(preset, step, out, csv, per_step)
        elif step in ("diffusion", "representation"):
            configs[step] = _stage_cfg(preset, step, out, latents_csv, per_step)
        elif step == "evaluation":
            configs[step] = apply_overrides(load_preset(preset, "evaluation"), per_step.get("evaluation", []))
    compress_kwargs = _compress_kwargs(per_step.get("compress", []))
    if "compress" in steps:
        configs["compress"] = compress_kwargs
    inputs = run_inputs(preset, csv, per_step, {s: c for s, c in configs.items() if s in steps})

    timings: dict[str, float] = {}

    def _notify(step: str, state: str) -> None:
        log.info("pipeline: %s %s", step, state)
        if on_step is not None:
            on_step(step, state)

    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, "ldae pipeline"):
        if restart:
            _restart(out)
        _check_inputs(out, inputs)
        for step in PIPELINE_STEPS:
            if step not in steps:
                continue
            folder = stage_dir(out, "latents" if step == "compress" else step)
            if _is_done(folder):
                seconds = _done_seconds(folder)
                _notify(step, "already done, skipped")
                timings[step] = seconds
                continue
            _notify(step, "started")
            start = time.perf_counter()
            info: dict[str, Any] = {}
            if step in ("autoencoder", "voxel_dae", "supervised"):  # baselines train on the images too
                info["best"] = str(fit(configs[step], resume=(folder / "checkpoints" / "last.ckpt").is_file()))
            elif step == "compress":
                ae = _best(out, "autoencoder")
                info["csv"] = str(compress(ae, csv, folder, **compress_kwargs))
            elif step in ("diffusion", "representation"):
                cfg = configs[step]
                if step == "representation":
                    cfg = dict(cfg, diffusion_checkpoint=str(_best(out, "diffusion")))
                info["best"] = str(fit(cfg, resume=(folder / "checkpoints" / "last.ckpt").is_file()))
            elif step == "evaluation":
                from ldae.evaluation.evaluate import evaluate

                info["metrics"] = str(evaluate(out, latents_csv, folder, cfg=configs[step]))
            seconds = time.perf_counter() - start
            info["seconds"] = seconds
            _mark_done(folder, info)
            timings[step] = seconds
            _notify(step, f"done in {seconds:.0f} s")
    return timings


INPUTS = "inputs.json"


def _done_seconds(folder: Path) -> float:
    """Seconds the step took when it ran (its ``done.json``; 0 when not recorded)."""
    import json

    try:
        return float(json.loads((folder / DONE).read_text()).get("seconds", 0.0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0.0


def _check_inputs(out: Path, inputs: dict[str, Any]) -> None:
    """Record ``inputs`` in a new run; in an existing one, LDAEError (one line) when they differ."""
    import json

    from ldae.errors import LDAEError

    path = out / INPUTS
    started = any(stage_dir(out, "latents" if s == "compress" else s).exists() for s in PIPELINE_STEPS)
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError):
            recorded = None
        if not isinstance(recorded, dict):
            raise LDAEError(f"{path}: unreadable record of this run's inputs; pass --restart to start over")
        diffs = _differences(recorded, inputs)
        if diffs:
            raise LDAEError(f"{out}: this run was made from other inputs ({'; '.join(diffs)}): pass --restart "
                            "to start over in this folder, or choose another --out")
        new_steps = {s: c for s, c in inputs["configs"].items() if s not in (recorded.get("configs") or {})}
        if new_steps:  # e.g. a baseline added to a finished run: recorded beside the others
            recorded.setdefault("configs", {}).update(new_steps)
            recorded.setdefault("overrides", {}).update(
                {s: v for s, v in inputs["overrides"].items() if s in new_steps})
            write_json(path, recorded)
        return
    if started:
        log.warning("%s: run folder from before inputs were recorded: assuming it was made from these inputs", out)
    write_json(path, inputs)


def _best(out: Path, stage: str) -> Path:
    from ldae.runs import find_checkpoint

    return find_checkpoint(out, stage)
