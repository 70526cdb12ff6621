"""ANTsPy helpers shared by raw-T1 preprocessing (:mod:`ldae.jobs.preprocess`) and atlas volumetry
(:mod:`ldae.evaluation.volumetry`): the optional import with its install hint, numpy/RAS <-> ANTs/LPS
images, the registration seed, transform-file cleanup and the ITK thread count of worker processes.

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ldae.errors import LDAEError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ldae[preprocess]' (or: pip install 'antspyx>=0.4')"
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def require_ants(purpose: str = "this step") -> Any:
    """Import ANTsPy, or raise LDAEError ``<purpose> needs ANTsPy: <how to install it>``."""
    try:
        import ants
    except ImportError:
        raise LDAEError(f"{purpose} needs ANTsPy: {INSTALL_HINT}") from None
    return ants


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
    ``ants.config``: set it for the calls inside the block, then restore the previous value."""
    ants = require_ants()
    previous = ants.config._random_seed
    ants.config._random_seed = None if seed is None else int(seed)
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
    Used as a process-pool initializer."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(int(threads)))
