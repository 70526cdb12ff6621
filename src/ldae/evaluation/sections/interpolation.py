"""``interpolation`` section: missing-timepoint prediction over all (start, target, end) triplets of test
subjects with >= 3 sessions (:mod:`ldae.evaluation.longitudinal`), against baselines that need no
interpolation at all.

Every method predicts the missing (target) visit from the start and end visits at
``t = (target - start) / (end - start)`` and is scored against the **input scan of the target visit**:

* ``ldae``: LERP of y_sem and SLERP of z_T (DDIM-inverted) between the two visits, decoded;
* ``nearest_visit`` (a): the input scan of the visit nearest in time, copied;
* ``ldae_nearest_visit`` (b): the LDAE reconstruction of that nearest visit (encode + decode at the same
  steps): the same decoding error as ``ldae``, no interpolation — LDAE must beat it for interpolation to
  add anything;
* ``latent_lerp`` (c): LERP of the two visits' autoencoder latents, decoded by the autoencoder;
* ``autoencoder_target`` (d): the autoencoder's reconstruction of the true target scan — an upper bound
  for every method that decodes through the autoencoder.

Which method beats which is said by paired differences on the same triplets with a 95 % interval from a
bootstrap over test subjects (:func:`ldae.evaluation.longitudinal.compare_methods`), overall and per time gap.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from ldae.evaluation.results import InterpolationSection
from ldae.evaluation.sections.common import ScanCache, progress, scores

#: method -> what it is (shown in metrics.json and the report)
METHODS = {
    "ldae": "LDAE: LERP y_sem, SLERP z_T, decoded",
    "nearest_visit": "(a) copy of the nearest visit's scan",
    "ldae_nearest_visit": "(b) LDAE reconstruction of the nearest visit (no interpolation)",
    "latent_lerp": "(c) LERP of the autoencoder latents, decoded",
    "autoencoder_target": "(d) autoencoder reconstruction of the true missing visit (upper bound)",
}
#: metric -> higher is better
COMPARED = {"ssim": True, "mse": False}
REFERENCE = "input scan of the missing (target) visit"


def interpolation_section(model: Any, scans: ScanCache, df: pd.DataFrame, steps: int,
                          max_triplets: int | None, seed: int = 0, batch_size: int = 8) -> InterpolationSection:
    """Scores of every method on every (sampled) triplet, their summary and the paired comparisons.

    Only the start and end visits are DDIM-inverted (each once, however many triplets share it); targets
    are only compressed. Inversions and decodings run ``batch_size`` scans at a time (DDIM acts on each
    scan independently, so batching changes nothing but the speed)."""
    from ldae.diffusion.interpolation import lerp, slerp
    from ldae.evaluation.longitudinal import (
        compare_methods,
        enumerate_triplets,
        nearest_visit_is_start,
        summarize_triplet_scores,
    )

    test = df[df["split"] == "test"]
    triplets = enumerate_triplets(test)
    if max_triplets is not None and len(triplets) > max_triplets:
        triplets = triplets.sample(n=int(max_triplets), random_state=0).sort_index()
    if triplets.empty:
        return InterpolationSection({m: {"ssim": None, "mse": None, "n_triplets": 0} for m in METHODS}, triplets,
                                    [], REFERENCE, dict(METHODS))
    needed = sorted(set(triplets[["start_index", "target_index", "end_index"]].to_numpy().ravel().tolist()))
    ends = sorted(set(triplets[["start_index", "end_index"]].to_numpy().ravel().tolist()))
    rows = list(triplets.itertuples(index=False))
    nearest = [int(tr.start_index) if bool(nearest_visit_is_start(float(tr.t))) else int(tr.end_index) for tr in rows]
    latent: dict[int, torch.Tensor] = {}
    enc: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    ldae_recon: dict[int, torch.Tensor] = {}  # LDAE reconstructions of the visits that are someone's nearest
    with torch.no_grad():
        for i in needed:
            latent[i] = model.compress(scans.get(i))
        for chunk in progress(_chunks(ends, batch_size), f"encoding start/end visits ({steps} steps)"):
            y, z = model.encode(scans.batch(chunk), steps)
            enc.update({i: (y[j : j + 1], z[j : j + 1]) for j, i in enumerate(chunk)})
        for chunk in _chunks(sorted(set(nearest)), batch_size):
            rec = model.decode(torch.cat([enc[i][0] for i in chunk]), torch.cat([enc[i][1] for i in chunk]), steps)
            ldae_recon.update({i: rec[j : j + 1] for j, i in enumerate(chunk)})
        predicted: list[torch.Tensor] = []
        for chunk in progress(_chunks(rows, batch_size), "predicting missing visits"):
            ys = [lerp(enc[int(tr.start_index)][0], enc[int(tr.end_index)][0], float(tr.t)) for tr in chunk]
            zs = [slerp(enc[int(tr.start_index)][1], enc[int(tr.end_index)][1], float(tr.t)) for tr in chunk]
            out = model.decode(torch.cat(ys), torch.cat(zs), steps)
            predicted += [out[j : j + 1] for j in range(len(chunk))]

    records = []
    for tr, near, ldae_pred in zip(rows, nearest, predicted):
        s, g, e, t = int(tr.start_index), int(tr.target_index), int(tr.end_index), float(tr.t)
        with torch.no_grad():
            preds = {
                "ldae": ldae_pred,
                "nearest_visit": scans.get(near),
                "ldae_nearest_visit": ldae_recon[near],
                "latent_lerp": model.decompress(lerp(latent[s], latent[e], t)),
                "autoencoder_target": model.decompress(latent[g]),
            }
        target = scans.get(g)
        for method, pred in preds.items():
            sc = scores(pred, target)
            records.append({**tr._asdict(), "method": method, "ssim": float(sc["ssim"][0]), "mse": float(sc["mse"][0])})
    table = pd.DataFrame.from_records(records)
    return InterpolationSection(summarize_triplet_scores(table, metrics=list(COMPARED)), table,
                                compare_methods(table, list(METHODS), COMPARED, seed=seed), REFERENCE, dict(METHODS))


def _chunks(items: list, size: int) -> list[list]:
    """``items`` in consecutive pieces of at most ``size`` (at least 1)."""
    size = max(int(size), 1)
    return [items[i : i + size] for i in range(0, len(items), size)]
