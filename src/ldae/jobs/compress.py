"""Latent export (``ldae compress``): encode every scan of a cohort with a trained stage-1 autoencoder.

Writes into ``out_dir``::

    latents/<image stem>_latent.npz       key 'latent': float32 (C, d, h, w) posterior mean (unscaled),
                                          key 'autoencoder_sha256': the checkpoint it came from
    cohort_with_compressed_latent.csv     the cohort + 'latent_path' + subject-level 'split'
    latent_meta.json                      scale_factor (= 1 / std of the train split's latents), latent
                                          shape/mean/std, checkpoint path + sha256, the autoencoder's
                                          weights fingerprint, spacing, shape

Later stages multiply latents by ``scale_factor`` (read with :func:`ldae.data.latents.read_latent_meta`);
nothing hard-codes it. A rerun skips a latent whose NPZ is newer than both its image and the checkpoint
and records the same checkpoint hash.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ldae.data.cohort import DEFAULT_LABELS, ensure_split, read_cohort, write_cohort
from ldae.data.latents import LATENT_DIR
from ldae.errors import CohortError
from ldae.io import nifti_stem, write_json, write_npz
from ldae.runs import COMPRESSED_CSV, LATENT_META

log = logging.getLogger(__name__)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file (streams; fine for multi-GB checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def latent_names(df: pd.DataFrame) -> list[str]:
    """NPZ names ``<stem>_latent.npz``; when stems repeat across folders they are prefixed with
    ``<subject>_M<session>_`` (CohortError if still not unique)."""
    stems = [nifti_stem(p) for p in df["path"]]
    if len(set(stems)) < len(stems):
        stems = [f"{s}_M{int(m):03d}_{stem}" for s, m, stem in zip(df["subject"], df["session"], stems)]
        if len(set(stems)) < len(stems):
            dup = pd.Series(stems)[pd.Series(stems).duplicated()].iloc[0]
            raise CohortError(f"two cohort rows map to the same latent name '{dup}' (same subject, session, file name)")
    return [f"{stem}_latent.npz" for stem in stems]


def _up_to_date(npz: Path, image: Path, ckpt: Path, sha: str, expected_shape: Sequence[int]) -> bool:
    if not npz.is_file():
        return False
    mtime = npz.stat().st_mtime
    if mtime < image.stat().st_mtime or mtime < ckpt.stat().st_mtime:
        return False
    try:
        with np.load(npz) as data:
            return (
                str(data["autoencoder_sha256"]) == sha
                and tuple(data["latent"].shape) == tuple(expected_shape)
            )
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return False


def default_out_dir(autoencoder_ckpt: str | os.PathLike) -> Path:
    """``RUN/latents`` for ``RUN/autoencoder/checkpoints/best.ckpt`` (i.e. beside the stage folder)."""
    ckpt = Path(autoencoder_ckpt).resolve()
    stage_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return stage_dir.parent / LATENT_DIR


def compress(
    autoencoder_ckpt: str | os.PathLike,
    csv: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    num_workers: int = 0,
    progress: bool = False,
    force: bool = False,
    devices: int = 1,
    num_nodes: int = 1,
) -> Path:
    """Encode every scan of ``csv`` to its posterior-mean latent; return the written cohort CSV path.

    Args:
        autoencoder_ckpt: stage-1 checkpoint (``best.ckpt``); its config gives spacing and shape.
        csv: cohort CSV; an existing ``split`` column is kept, otherwise one is assigned exactly as the
            autoencoder's training did (same seed and fractions).
        out_dir: output folder (default: ``latents/`` beside the autoencoder's run folder).
        batch_size, device, num_workers: encoding batch size, device kind (cpu, cuda, cuda:1, auto),
            DataLoader workers per process.
        progress: show a rich progress bar (main process).
        force: re-encode even up-to-date latents.
        devices, num_nodes: data-parallel processes per node and nodes (:func:`ldae.distributed.launch`);
            each process encodes its share of the scans, the main one writes the CSV and the metadata.
    """
    from torch.utils.data import DataLoader

    from ldae.checkpoints import load_autoencoder
    from ldae.data.datamodule import VolumeDataset
    from ldae.data.transforms import check_model_ready
    from ldae.distributed import launch
    from ldae.nets.autoencoder import latent_shape
    from ldae.nets.weights import weights_fingerprint

    ckpt = Path(autoencoder_ckpt).resolve()
    workers = launch(device, devices, num_nodes)
    net, cfg = load_autoencoder(ckpt, device=workers.device)
    fingerprint = weights_fingerprint(net)  # recorded by the next stages, checked whenever a run is loaded
    data = cfg["data"]
    spacing, shape = data["spacing"], [int(s) for s in data["shape"]]
    expected = latent_shape(cfg["model"], shape)
    out = Path(out_dir) if out_dir is not None else default_out_dir(ckpt)
    latent_dir = out / LATENT_DIR

    df = read_cohort(csv, labels=data.get("labels", DEFAULT_LABELS))
    df = ensure_split(
        df,
        seed=int(cfg.get("seed", 0)),
        test_fraction=float(data.get("test_fraction", 0.1)),
        val_fraction=float(data.get("val_fraction", 0.01)),
    )
    if not (df["split"] == "train").any():  # checked before any work (and before processes could diverge)
        raise CohortError(f"{csv}: the train split is empty, so the latent scale factor cannot be computed")
    # every scan's header (affine, field of view) before any encoding: a bad row 57 fails now, not later
    check_model_ready(list(df["path"]), spacing, shape, names=[f"{csv}: row {i + 2}" for i in range(len(df))])
    df = df.copy()
    df["latent_path"] = [str((latent_dir / name).resolve()) for name in latent_names(df)]
    sha = file_sha256(ckpt)
    todo = None
    if workers.is_main:  # decided once: another process may already be writing when a later one looks
        todo = [
            i for i, (npz, img) in enumerate(zip(df["latent_path"], df["path"]))
            if force or not _up_to_date(Path(npz), Path(img), ckpt, sha, expected)
        ]
        log.info("compress: %d of %d latents to encode (%d up to date)%s", len(todo), len(df), len(df) - len(todo),
                 f" on {workers.world_size} processes" if workers.world_size > 1 else "")
    todo = workers.broadcast(todo)

    def encode_mine() -> None:
        mine = workers.shard(todo)
        if mine:
            loader = DataLoader(VolumeDataset(df.iloc[mine], spacing, shape), batch_size=int(batch_size),
                                shuffle=False, num_workers=int(num_workers))
            _encode(net, loader, df, sha, workers.device, progress and workers.is_main)

    def write_meta() -> None:
        if workers.is_main:
            _write_meta(df, csv, ckpt, sha, fingerprint, expected, spacing, shape, out, len(todo))

    workers.together(encode_mine)  # a failure on any process stops all of them
    workers.together(write_meta)
    return out / COMPRESSED_CSV


def _write_meta(df: pd.DataFrame, csv: str | os.PathLike, ckpt: Path, sha: str, fingerprint: str,
                expected: Sequence[int], spacing: Any, shape: list[int], out: Path, encoded: int) -> None:
    """The scale factor from the train split's latents, ``latent_meta.json`` and the compressed CSV."""
    train = df[df["split"] == "train"]
    stats = latent_statistics(train["latent_path"], expected)
    meta: dict[str, Any] = {
        "scale_factor": 1.0 / stats["std"],
        "latent_std": stats["std"],
        "latent_mean": stats["mean"],
        "scale_factor_source": f"1/std (population) over {len(train)} train-split latents",
        "latent_shape": list(expected),
        "autoencoder_checkpoint": str(ckpt),
        "autoencoder_sha256": sha,
        "autoencoder_fingerprint": fingerprint,
        "spacing": spacing,
        "shape": shape,
        "cohort_csv": str(Path(csv).resolve()),
        "n_latents": int(len(df)),
        "split_counts": {s: int((df["split"] == s).sum()) for s in ("train", "val", "test")},
        "encoded_last_run": int(encoded),
    }
    write_json(out / LATENT_META, meta)
    out_csv = write_cohort(df, out / COMPRESSED_CSV)
    log.info("compress: scale factor %.6g (latent std %.6g); wrote %s", meta["scale_factor"], stats["std"], out_csv)


def _encode(net: torch.nn.Module, loader: Any, df: pd.DataFrame, sha: str, device: Any, progress: bool) -> None:
    """Encode the loader's scans (posterior mean, float32) and write one NPZ per row of ``df``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("encoding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("encode", total=len(loader.dataset))
        with torch.inference_mode():
            for batch in loader:
                z_mu, _ = net.encode(batch["image"].to(device).float())
                z_mu = z_mu.float().cpu().numpy()
                for row, latent in zip(batch["index"].tolist(), z_mu):
                    write_npz(df.loc[row, "latent_path"], latent=latent.astype(np.float32),
                              autoencoder_sha256=np.array(sha))
                bar.advance(task, len(z_mu))


def latent_statistics(paths: Sequence[str] | pd.Series, expected_shape: Sequence[int] | None = None) -> dict:
    """Mean and population standard deviation over all elements of the given latents (float64)."""
    from ldae.data.datamodule import read_latent

    count, total, total_sq = 0, 0.0, 0.0
    for path in paths:
        z = read_latent(path, expected_shape).astype(np.float64)
        count += z.size
        total += z.sum()
        total_sq += np.square(z).sum()
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    if var <= 0:
        raise CohortError("all train-split latents are constant: the latent scale factor is undefined")
    return {"mean": float(mean), "std": float(np.sqrt(var))}
