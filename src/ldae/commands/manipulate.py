"""``ldae manipulate``: move scans' y_sem along a direction (default: the AD-vs-CN probe's)."""

from __future__ import annotations

import argparse

from ldae.commands import _inference

HELP = "manipulate scans along a semantic direction (e.g. AD<->CN probe); NIfTI + strip PNG"


def add_arguments(p: argparse.ArgumentParser) -> None:
    _inference.add_common(p)
    p.add_argument("--direction", default=None,
                   help="probes file from `ldae evaluate` (default: RUN/evaluation/probes.json) or a .npy vector")
    p.add_argument("--alphas", type=float, nargs="+", default=[-2.0, -1.0, 0.0, 1.0, 2.0],
                   help="steps along the unit direction in normalised y_sem units (+ = towards AD)")


def _direction_path(args: argparse.Namespace):
    """``--direction``; else, for a run imported with ``ldae import-official``, the release's classifier
    (``RUN/release/classifier.json``); else the probes ``ldae evaluate`` saved for the run
    (``RUN/evaluation/probes.json``, also when ``--model`` names its representation stage folder)."""
    from pathlib import Path

    from ldae.jobs.import_official import release_classifier_path
    from ldae.jobs.predict import default_probes_path
    from ldae.runs import run_folder

    if args.direction:
        return Path(args.direction)
    release = release_classifier_path(run_folder(args.model))
    return release if release.is_file() else default_probes_path(args.model)


def _is_release_classifier(path) -> bool:
    from ldae.jobs.import_official import CLASSIFIER_FILE, RELEASE_DIR

    return path.name == CLASSIFIER_FILE and path.parent.name == RELEASE_DIR


def _direction(args: argparse.Namespace):
    import numpy as np

    from ldae.errors import LDAEError

    path = _direction_path(args)
    if not path.is_file():
        raise LDAEError(f"{path}: no direction file (run `ldae evaluate` first or pass --direction)")
    if path.suffix == ".npy":
        try:
            raw = np.load(path, allow_pickle=False)  # never unpickle: an object array is refused
        except (ValueError, OSError, EOFError) as exc:
            from ldae.errors import describe

            reason = "an object (pickled) array" if "allow_pickle" in str(exc) else describe(exc)
            raise LDAEError(f"{path}: not a numeric .npy direction ({reason})") from None
        return _checked_direction(raw, path)
    if _is_release_classifier(path):  # the published model's AD-vs-CN direction (standardised y_sem)
        from ldae.jobs.import_official import load_release_classifier

        return _checked_direction(np.asarray(load_release_classifier(path)["ad_vs_cn"]["coef"]), path)
    from ldae.evaluation.probes import load_probes

    # the probe's standardised coefficients: the steepest AD direction in y_sem normalised by its
    # training mean/std, which is the space LDAE.manipulate moves in
    return _checked_direction(np.asarray(load_probes(path)["ad_vs_cn"]["coef"]), path)


def _checked_direction(raw, path):
    """``raw`` as a float64 vector; LDAEError naming ``path`` unless it is a real, finite, non-zero 1-D
    array (a ``(1, d)`` or ``(d, 1)`` array counts as 1-D)."""
    import numpy as np

    from ldae.errors import LDAEError

    arr = np.asarray(raw)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise LDAEError(f"{path}: the direction must be a real-valued array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.ndim != 1 and sum(s > 1 for s in arr.shape) > 1:
        raise LDAEError(f"{path}: the direction must be a vector, got shape {arr.shape}")
    arr = arr.reshape(-1)
    if not np.isfinite(arr).all():
        raise LDAEError(f"{path}: the direction holds {int((~np.isfinite(arr)).sum())} NaN/inf value(s)")
    if arr.size == 0 or not np.any(arr):
        raise LDAEError(f"{path}: the direction is the zero vector")
    return arr


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ldae.viz import save_strip

    alphas = _inference.finite_values(args.alphas, "--alphas")
    tags = _inference.value_tags(alphas, signed=True)  # 1 and 1.001 -> alpha+1.000, alpha+1.001
    direction = _direction(args)
    model, items, _ = _inference.load(args)
    path = _direction_path(args)
    if path.suffix != ".npy" and not _is_release_classifier(path):  # probes: fitted on this representation?
        from ldae.evaluation.probes import check_probes_fitted_on, load_probes

        check_probes_fitted_on(load_probes(path), model.fingerprints["semantic_encoder"], path)
    if direction.size != model.encoder.emb_dim:
        from ldae.errors import LDAEError

        raise LDAEError(f"{args.direction or 'direction'}: has {direction.size} entries, this model's y_sem has "
                        f"{model.encoder.emb_dim}")
    out = Path(args.out)
    zero = min(range(len(alphas)), key=lambda i: abs(alphas[i]))
    for name, vol, affine in items:
        vols = model.manipulate(vol, direction, alphas)
        for tag, v in zip(tags, vols):
            _inference.save_volume(out, f"{name}_alpha{tag}", v[0], affine)
        save_strip(out / f"{name}_manipulation.png", [v[0] for v in vols], [f"α={a:+g}" for a in alphas],
                   diff_to=zero, title=f"{name}: along the direction (+ = towards AD)")
        print(f"{name}: {len(alphas)} manipulated volumes -> {out}")
    return 0
