"""Training stages (LightningModules) and their ``fit(cfg, resume)`` entry points: the three LDAE stages
and the two baselines. Checkpoints are read back (without Lightning) by :mod:`ldae.checkpoints` and
:mod:`ldae.baselines`.

Each stage module exposes ``fit(cfg: dict, resume: bool = False) -> pathlib.Path`` returning the best
checkpoint. The registry is lazy so that importing ``ldae.training`` stays cheap.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ldae.config import TRAINABLE_STAGES
from ldae.errors import ConfigError

#: module of each stage, where not named after it
_MODULE_NAMES = {"diffusion": "latent_diffusion"}
#: the module whose ``fit`` trains each config ``stage`` (:data:`ldae.config.TRAINABLE_STAGES`)
STAGE_MODULES: dict[str, str] = {
    stage: f"ldae.training.{_MODULE_NAMES.get(stage, stage)}" for stage in TRAINABLE_STAGES
}


def fit(cfg: dict, resume: bool = False) -> Path:
    """Train the stage named by ``cfg['stage']``; return the best checkpoint path."""
    stage = cfg.get("stage")
    if stage not in STAGE_MODULES:
        raise ConfigError(f"config key 'stage' is '{stage}' (choose from {', '.join(STAGE_MODULES)})")
    try:
        module = importlib.import_module(STAGE_MODULES[stage])
    except ModuleNotFoundError as exc:
        if exc.name == STAGE_MODULES[stage]:
            raise ConfigError(f"stage '{stage}' is not available in this version of ldae") from None
        raise
    return module.fit(cfg, resume=resume)
