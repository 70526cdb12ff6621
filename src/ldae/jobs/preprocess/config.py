"""Settings of ``ldae preprocess``: the packaged ``configs/preprocess.yaml``, a user YAML and dotted
overrides (one strict loader for every settings file, :func:`ldae.config.load_settings`), the range checks
of every value, and the fingerprint that tells a finished output made with other settings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldae.config import configs_root, get_dotted, load_settings
from ldae.data.ants import check_seed
from ldae.errors import ConfigError

CONFIG_NAME = "preprocess.yaml"


def default_config_path() -> Path:
    """The packaged defaults (``ldae/configs/preprocess.yaml``)."""
    return configs_root() / CONFIG_NAME


def load_preprocess_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """Packaged defaults, or a user YAML (which may ``_inherit: preprocess.yaml``), plus dotted
    overrides (strict keys, :func:`ldae.config.load_settings`); validated (ConfigError naming the key
    and value)."""
    cfg = load_settings(default_config_path(), path, overrides)
    validate_config(cfg, source=str(path or default_config_path()))
    return cfg



def validate_config(cfg: dict, source: str = "preprocess config") -> None:
    """Raise ConfigError for a missing section or an out-of-range value."""

    def get(key: str) -> Any:
        value = get_dotted(cfg, key, default=KeyError)
        if value is KeyError:
            raise ConfigError(f"{source}: missing key '{key}'")
        return value

    def positive(key: str) -> float:
        value = get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{source}: '{key}' must be a positive number, got {value!r}")
        return float(value)

    def int_list(key: str, length: int | None = None, minimum: int = 0) -> list[int]:
        value = get(key)
        ok = isinstance(value, list) and value and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value
        )
        if not ok or (length is not None and len(value) != length):
            size = f"{length} " if length else ""
            raise ConfigError(f"{source}: '{key}' must be a list of {size}integers >= {minimum}, got {value!r}")
        return value

    for key in ("output.spacing", "n4.spacing", "n4.spline_distance", "brain_extraction.spacing",
                "brain_extraction.syn_spacing", "brain_extraction.mask_spacing",
                "registration.spacing", "registration.sampling_rate", "registration.bins",
                "brain_extraction.sampling_rate", "brain_extraction.bins", "n4.tolerance"):
        positive(key)
    int_list("output.shape", 3, minimum=8)
    lo, hi = get("output.lower_percentile"), get("output.upper_percentile")
    number = (int, float)
    if not (isinstance(hi, number) and (lo is None or isinstance(lo, number)) and 0 <= (lo or 0) < hi <= 100):
        raise ConfigError(
            f"{source}: need 0 <= output.lower_percentile (or null) < output.upper_percentile <= 100, "
            f"got {lo!r}, {hi!r}"
        )
    int_list("n4.iterations", minimum=1)
    int_list("brain_extraction.syn_iterations", minimum=0)
    for section in ("brain_extraction", "registration"):
        its = int_list(f"{section}.iterations", minimum=0)
        shrink = int_list(f"{section}.shrink_factors", len(its), minimum=1)
        int_list(f"{section}.smoothing_sigmas", len(shrink), minimum=0)
    threshold = get("brain_extraction.mask_threshold")
    if not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise ConfigError(f"{source}: 'brain_extraction.mask_threshold' must be in (0, 1), got {threshold!r}")
    if not isinstance(get("brain_extraction.closing_mm"), (int, float)) or get("brain_extraction.closing_mm") < 0:
        raise ConfigError(f"{source}: 'brain_extraction.closing_mm' must be >= 0")
    check_seed(get("seed"), f"{source}: 'seed'")
    threads = get("threads")
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ConfigError(f"{source}: 'threads' must be an integer >= 0 (0 = automatic), got {threads!r}")
    mode = get("brain_extraction.skull_stripped")
    if mode not in ("auto", True, False):
        raise ConfigError(f"{source}: 'brain_extraction.skull_stripped' must be auto, true or false, got {mode!r}")
    positive("brain_extraction.stripped_max_ml")
    smoothing = get("qc.smoothing_mm")
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or smoothing < 0:
        raise ConfigError(f"{source}: 'qc.smoothing_mm' must be a number >= 0, got {smoothing!r}")
    for key in ("qc.min_correlation", "qc.min_mask_dice"):
        value = get(key)
        if not isinstance(value, (int, float)) or not -1 <= value <= 1:
            raise ConfigError(f"{source}: '{key}' must be in [-1, 1], got {value!r}")


def config_fingerprint(cfg: dict) -> str:
    """Short hash of the settings that change the output (``threads`` does not)."""
    relevant = {k: v for k, v in cfg.items() if k != "threads"}
    text = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

