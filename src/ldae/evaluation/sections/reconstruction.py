"""``reconstruction`` section (paper table 6) on the test split.

AutoencoderKL, LDDIM encoded (DDIM inversion without semantics), LDAE encoded, LDAE semantic-only
(random z_T) at each DDIM step count, and its control with another subject's y_sem (same z_T, largest step
count), and the autoencoder's reconstruction of that other subject's scan: what a decoding that reproduced
the other subject perfectly would score against this scan, so ``autoencoder − autoencoder_other`` bounds
what the semantic-only own − other gap can reach on the cohort; SSIM (3D Gaussian σ=1.5, data range 1), MSE, PSNR against the input scan, LPIPS when local
perceptual weights exist (else ``None`` with the reason), seconds per scan.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch

from ldae.evaluation.results import ReconstructionRow, ReconstructionScores, ReconstructionSection
from ldae.evaluation.sections.common import ScanCache, progress, scores

NO_LPIPS = "unavailable: no local perceptual weights (reconstruction.lpips_weights)"


def reconstruction_section(model: Any, scans: ScanCache, test_rows: list[int], steps_list: list[int],
                           batch_size: int, seed: int, lpips: Callable | None,
                           lpips_status: str = NO_LPIPS) -> ReconstructionSection:
    """Paper table 6 on ``test_rows``: the summary rows and the per-scan table."""
    records: list[dict[str, Any]] = []
    rows: list[ReconstructionRow] = []
    chunks = [test_rows[i : i + batch_size] for i in range(0, len(test_rows), batch_size)]

    def score_method(method: str, steps: int | None, fn: Callable[[torch.Tensor, list[int]], torch.Tensor]) -> None:
        """Reconstruct every test scan with ``fn``; record per-scan scores and the method's summary row."""
        values: dict[str, list] = {"ssim": [], "mse": [], "psnr": [], "lpips": []}
        seconds = 0.0
        for chunk in progress(chunks, f"{method}{'' if steps is None else f' ({steps} steps)'}"):
            x = scans.batch(chunk)
            start = time.perf_counter()
            with torch.no_grad():
                pred = fn(x, chunk)
            seconds += time.perf_counter() - start
            s = scores(pred, x)
            lp = lpips(pred, x).cpu().numpy() if lpips is not None else [None] * len(chunk)
            for j, row in enumerate(chunk):
                rec = {"method": method, "steps": steps, "row": row, "ssim": float(s["ssim"][j]),
                       "mse": float(s["mse"][j]), "psnr": float(s["psnr"][j]),
                       "lpips": None if lp[j] is None else float(lp[j])}
                records.append(rec)
                for k in values:
                    values[k].append(rec[k])
        rows.append(ReconstructionRow(method, steps, ReconstructionScores(
            ssim=float(np.mean(values["ssim"])), mse=float(np.mean(values["mse"])),
            psnr=float(np.mean(values["psnr"])), lpips=None if lpips is None else float(np.mean(values["lpips"])),
            seconds_per_scan=seconds / max(len(test_rows), 1))))

    score_method("autoencoder", None, lambda x, _: model.decompress(model.compress(x)))
    for steps in steps_list:
        score_method("lddim_encoded", steps, lambda x, _, s=steps: model.decode(None, model.encode(x, s, semantic=False)[1], s))
        score_method("ldae_encoded", steps, lambda x, _, s=steps: model.decode(*model.encode(x, s), s))
        score_method("ldae_semantic", steps, lambda x, _, s=steps: model.semantic_only(x, s, seed=seed))
    # Control for the semantic-only row: the same random z_T decoded with y_sem of *another* subject's test
    # scan. The SSIM gap between the two is what y_sem says about this particular brain.
    donor = other_subject_rows(test_rows, scans.df["subject"])
    if donor is not None:
        top = max(steps_list)

        def with_other_y(x: torch.Tensor, rows: list[int]) -> torch.Tensor:  # same z_T as ldae_semantic
            return model.semantic_only(x, top, seed=seed, y_sem=model.semantic(scans.batch([donor[r] for r in rows])))

        score_method("ldae_semantic_other", top, with_other_y)
        score_method("autoencoder_other", None,
                     lambda x, rows: model.decompress(model.compress(scans.batch([donor[r] for r in rows]))))
    return ReconstructionSection(rows, pd.DataFrame.from_records(records), lpips_status)


def other_subject_rows(rows: list[int], subject: pd.Series) -> dict[int, int] | None:
    """For each row, a row of a different subject (a fixed rotation of the list by half its length, moved
    on until the subject differs); None when all rows belong to one subject."""
    if subject.loc[rows].nunique() < 2:
        return None
    n, out = len(rows), {}
    for i, r in enumerate(rows):
        j = (i + n // 2) % n
        while subject.loc[rows[j]] == subject.loc[r]:
            j = (j + 1) % n
        out[r] = rows[j]
    return out


def lpips_metric(rcfg: dict, device: str) -> tuple[Callable | None, str]:
    """Per-sample 2.5D LPIPS from local weights (``reconstruction.lpips_network``/``lpips_weights``), and
    the status line; ``(None, reason)`` when the weights cannot be loaded."""
    if not rcfg.get("lpips_weights"):
        return None, NO_LPIPS
    from ldae.nets.perceptual import build_perceptual_loss

    setup = build_perceptual_loss({"perceptual_weight": 1.0, "perceptual_network": rcfg.get("lpips_network", "squeeze"),
                                   "perceptual_weights": rcfg["lpips_weights"], "perceptual_fake_3d_ratio": 1.0})
    if setup.loss is None:
        return None, f"unavailable: {setup.status}"
    net = setup.loss.to(device)

    def fn(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([net(pred[i : i + 1], ref[i : i + 1]).reshape(()) for i in range(pred.shape[0])])

    return fn, f"2.5D LPIPS: {setup.status}"
