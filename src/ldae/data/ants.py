"""ANTsPy helpers shared by raw-T1 preprocessing (:mod:`ldae.jobs.preprocess`) and atlas volumetry
(:mod:`ldae.evaluation.volumetry`): the optional import with its install hint, numpy/RAS <-> ANTs/LPS
images, the registration seed, transform-file cleanup and the ITK thread count of worker processes.

Repeatability (measured 2026-12-07, antspyx 0.6.3, one 6 mm scan registered to the template 3 times in one
process): an ANTs registration gives the same transform every time only when (a) the seed is a positive
integer — ``antsRegistration --random-seed 0`` is read as "seed from the clock", so seed 0 gave three
different affines — and (b) ITK runs one thread, since its multithreaded metric sums add in a varying order
(seed 1 with 2 threads: three different affines; seed 1 with 1 thread: identical, also across processes).
ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` once, when ``ants`` is imported: setting it afterwards
changes nothing. :func:`require_ants` therefore sets it to 1 (unless the caller set it) before the first
import, :func:`itk_threads` says what the process got, and :func:`seeded` refuses seed 0.

ANTsPy is an optional extra (``ldae[preprocess]``); it is imported only inside these functions.

Coordinates: nibabel affines map voxels to RAS+ world millimetres, ITK (ANTs) uses LPS+ (x and y negated).
An ANTs image stores ``origin`` (world position of voxel 0), ``spacing`` (mm per axis) and ``direction``
(unit axis vectors as columns), so with ``F = diag(-1, -1, 1)``::

    RAS affine  A = [[F·D·diag(s), F·o], [0, 1]]      and back   D·diag(s) = F·A[:3, :3],  o = F·A[:3, 3].
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ldae.errors import ConfigError, LDAEError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ldae[preprocess]' (or: pip install 'antspyx>=0.4')"
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
THREADS_ENV = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"


#: ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` as it was when this module first imported ``ants`` (None: not yet)
_threads_at_import: int | None = None


def require_ants(purpose: str = "this step") -> Any:
    """Import ANTsPy, or raise LDAEError ``<purpose> needs ANTsPy: <how to install it>``.

    On the first import in a process, ITK's thread count defaults to 1 (repeatable registrations, module
    docstring); set ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` beforehand, or call :func:`set_worker_threads`,
    to trade repeatability for speed."""
    global _threads_at_import
    imported_before = "ants" in sys.modules
    if _threads_at_import is None and not imported_before:
        os.environ.setdefault(THREADS_ENV, "1")
    try:
        import ants
    except ImportError:
        raise LDAEError(f"{purpose} needs ANTsPy: {INSTALL_HINT}") from None
    if _threads_at_import is None:
        # ants imported elsewhere first: ITK took what the environment held then (we assume now) or the CPUs
        _threads_at_import = _env_threads(default=(os.cpu_count() or 1) if imported_before else 1)
    return ants


def _env_threads(default: int) -> int:
    value = os.environ.get(THREADS_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else default


def itk_threads() -> int:
    """ITK's thread count in this process: what the environment held when ``ants`` was first imported (before
    that, what it will take); 1 means registrations repeat exactly."""
    return _threads_at_import if _threads_at_import is not None else _env_threads(default=1)


def _is_positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and int(value) >= 1


def check_seed(seed: int | None, where: str = "seed") -> int | None:
    """``seed`` if it is None or a positive integer; else ConfigError naming ``where``: ANTs reads seed 0 as
    "seed from the clock" (module docstring), so 0 would silently be unseeded."""
    if seed is None:
        return None
    if not _is_positive_int(seed):
        raise ConfigError(f"{where}: the ANTs seed must be a positive integer or null (ANTs reads 0 as "
                          f"'seed from the clock'), got {seed!r}")
    return int(seed)


def check_seeds(seeds: Any, where: str = "seeds") -> list[int]:
    """``seeds`` as a list if it is a non-empty sequence of distinct positive integers (one measurement per
    seed); else ConfigError naming ``where`` (see :func:`check_seed` for why 0 is refused)."""
    if (not isinstance(seeds, (list, tuple, range)) or not seeds or not all(_is_positive_int(s) for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"{where}: need a list of distinct positive integers (ANTs reads 0 as "
                          f"'seed from the clock'), got {seeds!r}")
    return [int(s) for s in seeds]


def to_ants(data: np.ndarray, affine: np.ndarray) -> Any:
    """An ANTs image from a 3D voxel array and its RAS 4x4 voxel-to-world affine (module docstring).

    A sheared affine cannot be represented by ITK: its axes are replaced by the nearest rotation (logged).
    """
    ants = require_ants()
    affine = np.asarray(affine, dtype=np.float64)
    linear = _RAS_TO_LPS @ affine[:3, :3]
    origin = _RAS_TO_LPS @ affine[:3, 3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    if np.abs(direction.T @ direction - np.eye(3)).max() > 1e-4:
        u, _, vt = np.linalg.svd(direction)
        direction = u @ vt
        log.warning("sheared affine: axes replaced by the nearest rotation")
    return ants.from_numpy(
        np.ascontiguousarray(data, dtype=np.float32),
        origin=tuple(float(o) for o in origin),
        spacing=tuple(float(s) for s in spacing),
        direction=direction,
    )


def ants_affine(image: Any) -> np.ndarray:
    """The RAS 4x4 voxel-to-world affine of an ANTs image (inverse of :func:`to_ants`)."""
    affine = np.eye(4)
    affine[:3, :3] = _RAS_TO_LPS @ np.asarray(image.direction) @ np.diag(image.spacing)
    affine[:3, 3] = _RAS_TO_LPS @ np.asarray(image.origin)
    return affine


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """ANTsPy reads its registration seed (``--random-seed``, the metric's voxel sampling) from
    ``ants.config``: set it for the calls inside the block, then restore the previous value. ``seed`` must be
    None (unseeded) or positive (:func:`check_seed`)."""
    seed = check_seed(seed)
    ants = require_ants()
    previous = ants.config._random_seed
    ants.config._random_seed = seed
    try:
        yield
    finally:
        ants.config._random_seed = previous


def remove_transforms(registration: dict[str, Any]) -> None:
    """Delete the transform files an ``ants.registration`` result names (ANTs writes them to a
    temporary folder and never removes them)."""
    names = set(registration.get("fwdtransforms", [])) | set(registration.get("invtransforms", []))
    for name in names:
        if isinstance(name, str):
            Path(name).unlink(missing_ok=True)


def set_worker_threads(threads: int) -> None:
    """Thread count of ITK (read from the environment when ITK first runs in this process) and, unless
    the caller set it, of OpenMP: a pool of ``w`` worker processes gives each ``cpus // w`` threads.
    Used as a process-pool initializer; it must run before ``ants`` is imported to take effect."""
    os.environ[THREADS_ENV] = str(int(threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(int(threads)))
