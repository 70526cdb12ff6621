"""Use a trained run on new scans: P(AD) and estimated age per scan (what ``ldae predict`` wraps).

The semantic encoder maps each model-ready scan to ``y_sem``; the two linear probes that ``ldae evaluate``
fitted on the cohort's training split (``RUN/evaluation/probes.json``) turn it into the AD-vs-CN
probability and an age estimate. Nothing is refitted here, so predictions are only as good as those
probes (their held-out test metrics travel with the result).

Before any network runs, every scan's NIfTI header is checked (exists, readable, 3D, an affine that places
it in MNI space, and a field of view covering the brain on the model's grid; :mod:`ldae.data.geometry`);
each scan is then resampled onto the model's grid by its affine. ``preprocess=True`` runs
:func:`ldae.jobs.preprocess.preprocess_scan` on raw T1s first (ANTsPy).

    from ldae.model import LDAE
    from ldae.jobs.predict import predict

    result = predict(LDAE.load("runs/demo/run"), ["scan.nii.gz"])
    result.table()            # scan, name, p_ad, label, age
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ldae.errors import CohortError, LDAEError, find_user_error

log = logging.getLogger(__name__)
PROBES_FILE = "probes.json"
DEFAULT_FOV_TOLERANCE = 0.2  # kept for the API: any finite value means "check the geometry"


# ------------------------------------------------------------------------------------------- result
@dataclass
class Predictions:
    """Per-scan outputs, in input order."""

    scans: list[str]
    names: list[str]
    p_ad: np.ndarray
    age: np.ndarray
    y_sem: np.ndarray
    threshold: float = 0.5
    positive: str = "AD"
    negative: str = "CN"
    probes_path: str | None = None
    probe_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        """Predicted class per scan (``positive`` when P(AD) >= the probe's threshold)."""
        return [self.positive if p >= self.threshold else self.negative for p in self.p_ad]

    def records(self) -> list[dict[str, Any]]:
        """One plain dict per scan: scan, name, p_ad, label, age."""
        return [
            {"scan": s, "name": n, "p_ad": float(p), "label": lab, "age": float(a)}
            for s, n, p, lab, a in zip(self.scans, self.names, self.p_ad, self.labels, self.age)
        ]

    def table(self):
        """The records as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame.from_records(self.records(), columns=["scan", "name", "p_ad", "label", "age"])

    def to_json(self) -> dict[str, Any]:
        """Records plus what produced them (probes file, threshold, probes' held-out test metrics)."""
        return {
            "probes": self.probes_path,
            "threshold": self.threshold,
            "positive_class": self.positive,
            "probe_test_metrics": self.probe_metrics,
            "predictions": self.records(),
        }

    def save_embeddings(self, path: str | Path) -> Path:
        """NPZ with ``y_sem`` (n, d), ``scan``, ``name``, ``p_ad`` and ``age`` (written atomically)."""
        from ldae.io import write_npz

        return write_npz(path, y_sem=self.y_sem.astype(np.float32), scan=np.asarray(self.scans, dtype=str),
                         name=np.asarray(self.names, dtype=str), p_ad=self.p_ad, age=self.age)


# ------------------------------------------------------------------------------------------- probes
def default_probes_path(run: str | Path) -> Path:
    """``RUN/evaluation/probes.json`` (where ``ldae evaluate`` saves the fitted probes) of the run that
    ``run`` names (the run folder, its representation stage folder or a checkpoint in it)."""
    from ldae.runs import run_folder, stage_dir

    return stage_dir(run_folder(run), "evaluation") / PROBES_FILE


def load_run_probes(run: str | Path | None, probes: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """The probes of ``run`` (or the explicit ``probes`` file) and the path they came from. A run imported
    from the official release (``ldae import-official --classifier``) uses the release's classifier.

    Raises LDAEError when there are none, saying to run ``ldae evaluate`` first."""
    from ldae.evaluation.probes import load_probes

    if probes is None:
        if run is None or (Path(run).is_file() and Path(run).parent.name != "checkpoints"):  # a loose checkpoint
            raise LDAEError(f"{run}: is not a run folder, so it has no saved probes; pass the probes file "
                            "that `ldae evaluate` wrote (--probes RUN/evaluation/probes.json)")
        from ldae.jobs.import_official import load_release_classifier, release_classifier_path
        from ldae.runs import run_folder

        release = release_classifier_path(run_folder(run))
        if release.is_file():  # an imported official release: its own AD-vs-CN classifier (no age probe)
            return load_release_classifier(release), release
        path = default_probes_path(run)
    else:
        path = Path(probes)
    if not path.is_file():
        raise LDAEError(f"{path}: no saved probes; run `ldae evaluate --model {run}` first "
                        "(or pass --probes FILE)")
    return load_probes(path), path


# --------------------------------------------------------------------------------------- scan checks
def check_scan(path: str | Path, spacing: float | Sequence[float] | None = None, shape: Sequence[int] | None = None,
               fov_tolerance: float | None = DEFAULT_FOV_TOLERANCE) -> None:
    """Header-only check that ``path`` is a readable 3D NIfTI that can be resampled onto the model's grid.

    Args:
        path: the scan.
        spacing, shape: the model's grid (mm, voxels; MNI-centred, :mod:`ldae.data.geometry`); None: only
            check that the file is a readable 3D NIfTI.
        fov_tolerance: None or inf skips the geometry check (affine and brain coverage); any finite value
            keeps it (a larger field of view than the model's is fine: the scan is resampled by its affine).

    Raises CohortError naming the file (missing, a folder, unreadable, not 3D, an affine that cannot place
    it in MNI space, or a field of view that misses part of the brain).
    """
    from ldae.data.geometry import ModelGrid, check_geometry, header_geometry

    if spacing is None or shape is None or fov_tolerance is None or not np.isfinite(fov_tolerance):
        header_geometry(path)
        return
    check_geometry(path, ModelGrid.of(spacing, shape))


# ------------------------------------------------------------------------------------------ preprocess
def preprocess_scans(scans: Sequence[str | Path], workdir: str | Path, config: str | Path | None = None,
                     progress: bool = True) -> list[Path]:
    """Raw T1s -> model-ready NIfTIs in ``workdir`` (the ``ldae preprocess`` pipeline; needs ANTsPy)."""
    from ldae.io import nifti_stem
    from ldae.jobs.preprocess import load_preprocess_config, preprocess_scan, require_ants

    try:
        require_ants()
    except LDAEError as exc:
        raise LDAEError(f"--preprocess: {exc}") from None
    cfg = load_preprocess_config(config)
    outs = []
    with _progress(progress, "preprocessing", len(scans)) as advance:
        for i, scan in enumerate(scans):
            out = Path(workdir) / f"{i:04d}_{nifti_stem(scan)}.nii.gz"
            preprocess_scan(scan, out, cfg)
            outs.append(out)
            advance(1)
    return outs


# ----------------------------------------------------------------------------------------- prediction
@contextlib.contextmanager
def _progress(enabled: bool, description: str, total: int) -> Iterator[Any]:
    """Yield ``advance(n)``; a transient rich bar on stderr when enabled (stdout stays clean for --json)."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def predict_volumes(model: Any, probes: dict[str, Any], x: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(p_ad, age, y_sem)`` for model-ready volumes ``x`` ``(B, 1, D, H, W)`` already in memory."""
    import torch

    from ldae.evaluation.probes import predict_probes

    with torch.no_grad():
        y = model.semantic(x).double().cpu().numpy()
    if "age" not in probes:  # the official release's classifier: P(AD) only
        from ldae.jobs.import_official import release_p_ad

        return release_p_ad(probes, y), np.full(len(y), np.nan), y
    p_ad, age = predict_probes(probes, y)
    return p_ad, age, y


def predict(
    model: Any,
    scans: Sequence[str | Path],
    probes: str | Path | dict[str, Any] | None = None,
    batch_size: int = 4,
    preprocess: bool = False,
    preprocess_config: str | Path | None = None,
    fov_tolerance: float | None = DEFAULT_FOV_TOLERANCE,
    device: str = "cpu",
    progress: bool = True,
) -> Predictions:
    """P(AD) and estimated age of each scan.

    Args:
        model: an :class:`ldae.model.LDAE`, or a run folder to load one from.
        scans: NIfTI paths (model-ready unless ``preprocess``).
        probes: loaded probes, a probes JSON, or None for ``RUN/evaluation/probes.json`` of ``model``.
        batch_size: scans per encoder forward pass.
        preprocess: run the raw-T1 pipeline first (into a temporary folder, removed afterwards).
        preprocess_config: YAML overriding the preprocessing defaults.
        fov_tolerance: see :func:`check_scan` (applied to the scans the model reads).
        device: where a model given as a folder is loaded.
        progress: show progress bars on stderr.
    """
    if int(batch_size) < 1:
        raise LDAEError(f"batch size must be >= 1, got {batch_size}")
    scans = [str(s) for s in scans]
    if not scans:
        raise LDAEError("no scans given")
    run = getattr(model, "run", None) if not isinstance(model, (str, Path)) else Path(model)
    if isinstance(probes, dict):
        probe_obj, probes_path = probes, None
    else:
        probe_obj, probes_path = load_run_probes(run, probes)  # before the (slow) model load
    for scan in scans:  # readable 3D NIfTIs, checked before the (slow) model load
        check_scan(scan)
    if isinstance(model, (str, Path)):
        from ldae.model import LDAE

        model = LDAE.load(model, device=device)
    _check_probe_size(probe_obj, model, probes_path)
    if getattr(model, "fingerprints", {}).get("semantic_encoder"):  # probes of this representation, not another's
        from ldae.evaluation.probes import check_probes_fitted_on

        check_probes_fitted_on(probe_obj, model.fingerprints["semantic_encoder"], probes_path)
    with tempfile.TemporaryDirectory(prefix="ldae-predict-") as tmp:
        inputs = preprocess_scans(scans, tmp, preprocess_config, progress) if preprocess else [Path(s) for s in scans]
        for src, path in zip(scans, inputs):
            try:
                check_scan(path, model.spacing, model.shape, fov_tolerance)
            except CohortError as exc:
                if preprocess:
                    raise CohortError(f"{src} (after preprocessing): {exc}") from None
                raise
        p_parts, age_parts, y_parts = [], [], []
        with _progress(progress, "predicting", len(scans)) as advance:
            for start in range(0, len(inputs), int(batch_size)):
                chunk = inputs[start : start + int(batch_size)]
                x = _load_batch(model, chunk, scans[start : start + len(chunk)])
                p, a, y = predict_volumes(model, probe_obj, x)
                p_parts.append(p)
                age_parts.append(a)
                y_parts.append(y)
                advance(len(chunk))
    from ldae.io import nifti_stem

    ad = probe_obj["ad_vs_cn"]
    classes = list(ad.get("classes", ["CN", "AD"]))
    positive = str(ad.get("positive_class", classes[-1]))
    negative = next((c for c in classes if c != positive), "CN")
    return Predictions(
        scans=scans,
        names=[nifti_stem(s) for s in scans],
        p_ad=np.concatenate(p_parts),
        age=np.concatenate(age_parts),
        y_sem=np.concatenate(y_parts),
        threshold=float(ad.get("threshold", 0.5)),
        positive=positive,
        negative=negative,
        probes_path=None if probes_path is None else str(probes_path),
        probe_metrics={"ad_vs_cn": dict(ad.get("metrics", {})), "age": dict(probe_obj.get("age", {}).get("metrics", {}))},
    )


def _check_probe_size(probes: dict[str, Any], model: Any, source: Path | None) -> None:
    """LDAEError when the probes were fitted on embeddings of another size than this model's y_sem."""
    d = int(model.encoder.emb_dim)
    for part in ("ad_vs_cn", "age"):
        if part not in probes:  # the official release's classifier has no age probe
            continue
        n = len(probes[part]["coef"])
        if n != d:
            raise LDAEError(f"{source or 'probes'}: the {part} probe expects {n}-d embeddings, this model's "
                            f"y_sem has {d}: the probes come from another run (rerun `ldae evaluate`)")


def _load_batch(model: Any, paths: Sequence[Path], names: Sequence[str]) -> Any:
    """Model-ready volumes of ``paths`` as one ``(B, 1, D, H, W)`` tensor; errors name the user's file."""
    import torch

    vols = []
    for path, name in zip(paths, names):
        try:
            vols.append(model.load_volume(path)[0])
        except Exception as exc:
            err = find_user_error(exc)
            if err is None:
                raise
            message = str(err)
            if str(path) != name and str(path) in message:
                message = message.replace(str(path), f"{name} (after preprocessing)")
            raise type(err)(message) from None
    return torch.cat(vols)
