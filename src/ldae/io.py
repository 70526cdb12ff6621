"""Output paths: the output-folder check made before any work, and atomic file output: every file the
project writes goes to a temporary name in the same folder and is renamed into place, so an interrupted run
never leaves a half-written file under the final name."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

#: file-name endings of NIfTI volumes (longest first, so that ``.nii.gz`` is stripped whole)
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti_name(path: str | os.PathLike) -> bool:
    """Whether the file name ends in ``.nii`` or ``.nii.gz``."""
    return Path(path).name.endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
    """File name without ``.nii.gz`` / ``.nii`` (another name loses its last suffix): the base of every
    output named after an input scan (``scan.nii.gz`` -> ``scan_latent.npz``, ``scan_qc.png``, ...)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def check_output_folder(out: str | os.PathLike) -> Path:
    """``out`` as a Path if it can be the output folder: not an existing file, and the folder itself or
    the nearest existing parent it would be created in is a writable folder. ConfigError otherwise.
    Nothing is created: called before any work so that a refused folder costs nothing."""
    from ldae.errors import ConfigError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out is an existing file, not a folder")
    parent = out
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{out}: --out cannot be created ({parent} is a file)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{out}: --out is not writable (no write permission on {parent})")
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error delete it.

    ``suffix`` defaults to the final name's full suffix (e.g. ``.nii.gz``) so that writers which infer
    the format from the extension still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write a text file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented, strict JSON: numpy scalars/arrays and paths converted, NaN
    and ±inf written as ``null`` (``NaN`` is not JSON: browsers and most parsers reject it)."""

    def _plain(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: _plain(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [_plain(v) for v in o]
        if isinstance(o, np.ndarray):
            return _plain(o.tolist())
        if isinstance(o, np.generic):
            o = o.item()
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, Path):
            return str(o)
        return o

    def _default(o: Any) -> Any:
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    return write_text(path, json.dumps(_plain(obj), indent=2, default=_default, allow_nan=False) + "\n")


def write_csv(path: str | os.PathLike, df: Any) -> Path:
    """Atomically write a pandas DataFrame as CSV (no index)."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Atomically write a compressed NPZ."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    return Path(path)


def write_nifti(path: str | os.PathLike, volume: np.ndarray, affine: np.ndarray) -> Path:
    """Atomically write a float32 NIfTI with the given 4x4 affine (qform and sform set)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically ``torch.save`` an object (checkpoints, state dicts)."""
    import torch

    with atomic_path(path, suffix=".tmp") as tmp:
        torch.save(obj, tmp)
    return Path(path)
