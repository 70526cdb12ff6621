"""``ldae evaluate``: every number of the paper's tables on any cohort, plus the quantified extras.

The orchestrator: it loads the model and the cohort, runs the sections of :mod:`ldae.evaluation.sections`
in order, writes their tables and figures into ``out`` and ``out/metrics.json``
(:meth:`ldae.evaluation.results.EvaluationResult.to_json`):

* ``probe``: linear probes (AD vs CN, age) on frozen y_sem of the learned encoder, of an untrained
  (randomly initialised, same architecture) encoder, and of an oracle (true regional volumes + age for
  AD vs CN; volumes alone for age, since age would predict itself) when the cohort has ground truth; and
  a reference: the first ``probes.latent_pca_components`` principal components of the autoencoder's
  latents (what the compressed latent carries linearly at this resolution).
* ``factors``: what y_sem encodes — a ridge probe per known factor column (``probes.factors``: ground-truth
  volumes, age), test-split R² for the learned and the untrained encoder and the latent PCA.
* ``reconstruction``: :mod:`~ldae.evaluation.sections.reconstruction` (paper table 6).
* ``interpolation`` and ``interpolation_comparison``: :mod:`~ldae.evaluation.sections.interpolation`
  (missing-timepoint prediction against copying the nearest visit, its LDAE reconstruction, latent LERP and
  the autoencoder's reconstruction of the true visit; which beats which, with subject-bootstrap intervals).
* ``manipulation``: :mod:`~ldae.evaluation.sections.manipulation` (volume change along the AD direction,
  checked for sign and size against the cohort's own AD−CN difference).
* ``baselines``: the voxel-space DAE and the supervised encoder, when the run holds them.
* ``diagnostics``: :mod:`~ldae.evaluation.sections.diagnostics` (does the latent DDPM memorise its training
  latents, how much of its error G_ψ removes with the scan's own / another subject's y_sem, and the factor
  R² / AD AUC of every feature set, raw-voxel PCA included, in one table).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ldae.errors import LDAEError
from ldae.evaluation.results import (
    BaselineResult,
    CohortInfo,
    EvaluationResult,
    ReconstructionScores,
)
from ldae.evaluation.sections.common import GT_VOLUMES, ScanCache, embed, scores
from ldae.evaluation.sections.diagnostics import run_diagnostics
from ldae.evaluation.sections.figures import figures_section
from ldae.evaluation.sections.interpolation import interpolation_section
from ldae.evaluation.sections.manipulation import (
    check_manipulation_config,
    class_separation,
    manipulation_section,
    volumetry_check,
)
from ldae.evaluation.sections.probing import factor_section, probe_section
from ldae.evaluation.sections.reconstruction import lpips_metric, reconstruction_section
from ldae.io import write_csv, write_json, write_npz

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- entry point
def evaluate(run: str | Path, csv: str | Path, out: str | Path, cfg: dict | None = None,
             overrides: list | tuple = ()) -> Path:
    """Run the whole suite; return the path of ``out/metrics.json``."""
    from ldae.checkpoints import open_checkpoint
    from ldae.config import apply_overrides, load_preset, save_config
    from ldae.data.cohort import ensure_split, read_cohort
    from ldae.distributed import resolve_device
    from ldae.evaluation.plots import plot_lda, plot_manipulation, plot_triplet_scores
    from ldae.evaluation.probes import lda_projection, pca_features
    from ldae.model import LDAE
    from ldae.nets.semantic_encoder import build_semantic_encoder
    from ldae.runs import find_checkpoint

    run, out = Path(run), Path(out)
    rep = open_checkpoint(find_checkpoint(run, "representation"), "representation")  # read once, passed along
    if cfg is None:
        cfg = load_preset(rep.meta.preset or "paper", "evaluation")
    cfg = apply_overrides(cfg, list(overrides))
    check_manipulation_config(cfg["manipulation"])
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    seed, bs, device = int(cfg.get("seed", 0)), int(cfg["batch_size"]), resolve_device(str(cfg.get("device", "auto")))
    model = LDAE.load(run, device=device, representation=rep, guidance_scale=cfg.get("guidance_scale"))
    df = ensure_split(read_cohort(csv), seed=seed)
    scans = ScanCache(df, model.spacing, model.shape, device)
    all_rows = df.index.tolist()
    test_rows = df.index[df["split"] == "test"].tolist()
    if not test_rows:
        raise LDAEError(f"{csv}: the test split is empty")
    timings: dict[str, float] = {}

    # ---- probes
    t0 = time.perf_counter()
    learned = embed(model.semantic, scans, all_rows, bs, "y_sem (learned encoder)")
    torch.manual_seed(int(cfg["probes"]["untrained_seed"]))
    enc_cfg = rep.config["model"]["semantic_encoder"]
    untrained_net = build_semantic_encoder(enc_cfg, load_pretrained=False).to(device).eval()
    untrained = embed(untrained_net, scans, all_rows, bs, "y_sem (untrained encoder)")
    features = {"learned": learned, "untrained": untrained}
    if cfg["probes"].get("latent_pca_components"):
        latents = embed(lambda x: model.compress(x).flatten(1), scans, all_rows, bs, "latents (PCA control)")
        features["latent_pca"] = pca_features(latents, (df["split"] == "train").to_numpy(),
                                              int(cfg["probes"]["latent_pca_components"]))
    if cfg["probes"].get("voxel_pca_components"):
        voxels = embed(lambda x: x.flatten(1), scans, all_rows, bs, "voxels (PCA control)")
        features["voxel_pca"] = pca_features(voxels, (df["split"] == "train").to_numpy(),
                                             int(cfg["probes"]["voxel_pca_components"]))
        del voxels
    if all(c in df.columns for c in GT_VOLUMES):
        features["oracle"] = np.column_stack([df[c].to_numpy(dtype=float) for c in GT_VOLUMES] + [df["age"].to_numpy(dtype=float)])
    probes = probe_section(features, df, seed)
    probes["learned"].save(out / "probes.json", encoder_fingerprint=model.fingerprints["semantic_encoder"],
                           representation_checkpoint=model.checkpoints["representation"])
    write_npz(out / "embeddings.npz", y_sem=learned, untrained=untrained, index=np.asarray(all_rows))
    factors = factor_section({k: v for k, v in features.items() if k != "oracle"}, df,
                             list(cfg["probes"].get("factors") or []), seed)
    plot_lda(out / "lda.png", lda_projection(learned, df["diagnosis"].to_numpy(), (df["split"] == "train").to_numpy()),
             df["diagnosis"].to_numpy(), split=df["split"].to_numpy())
    timings["probes"] = time.perf_counter() - t0

    # ---- diagnostics: DDPM memorisation, the gap G_ψ fills, the representation table (issue 17)
    diagnostics = None
    dcfg = cfg.get("diagnostics") or {}
    if dcfg.get("enabled", True):
        t0 = time.perf_counter()
        if not cfg["probes"].get("latent_pca_components"):
            latents = embed(lambda x: model.compress(x).flatten(1), scans, all_rows, bs, "latents (diagnostics)")
        diagnostics = run_diagnostics(model, df, latents, learned, probes, factors, dcfg, bs, seed,
                                      features={k: v for k, v in features.items() if k != "oracle"})
        timings["diagnostics"] = time.perf_counter() - t0

    # ---- reconstruction
    t0 = time.perf_counter()
    rcfg = cfg["reconstruction"]
    rec_rows = test_rows[: rcfg["max_scans"]] if rcfg.get("max_scans") else test_rows
    lpips_fn, lpips_status = lpips_metric(rcfg, device)
    recon = reconstruction_section(model, scans, rec_rows, [int(s) for s in rcfg["steps"]], bs, seed, lpips_fn,
                                   lpips_status)
    write_csv(out / "reconstruction.csv", recon.per_scan)
    timings["reconstruction"] = time.perf_counter() - t0

    # ---- interpolation / missing timepoints
    t0 = time.perf_counter()
    icfg = cfg["interpolation"]
    interp = interpolation_section(model, scans, df, int(icfg["steps"]), icfg.get("max_triplets"), seed, bs)
    if not interp.scores.empty:
        write_csv(out / "interpolation_triplets.csv", interp.scores)
        plot_triplet_scores(out / "interpolation.png", interp.summary)
    timings["interpolation"] = time.perf_counter() - t0

    # ---- manipulation
    t0 = time.perf_counter()
    mcfg = cfg["manipulation"]
    # the probe's coefficients live in y_sem standardised by the train split: the model's normalised y_sem
    man = manipulation_section(model, scans, df, probes["learned"].ad_model.coef, mcfg, out)
    separation = class_separation(learned, df.loc[all_rows], model.ysem_mean.cpu().numpy(),
                                  model.ysem_std.cpu().numpy(), probes["learned"].ad_model.coef,
                                  max(abs(a) for a in man.alphas) if man.alphas else None)
    man = replace(man, volumetry_check=volumetry_check(scans, df, mcfg), separation=separation)
    changes = {f"{region} ({name.replace('_to_', '→').upper()})": [arm.change_pct[f"{a:g}"][f"{region}_change_pct"]
                                                                   for a in man.alphas]
               for name, arm in man.arms.items() if arm.n_scans
               for region in ("ventricle", "hippocampus")}
    if changes:
        plot_manipulation(out / "manipulation_volumes.png", man.alphas, changes)
    timings["manipulation"] = time.perf_counter() - t0

    # ---- qualitative figures for the report
    t0 = time.perf_counter()
    figures_section(model, scans, df, out, int(icfg["steps"]), seed)
    timings["figures"] = time.perf_counter() - t0

    # ---- baselines
    baselines = baselines_section(run, scans, df, cfg, bs, seed) if cfg["baselines"]["enabled"] else {}
    result = EvaluationResult(CohortInfo(str(csv), len(df), len(test_rows)), timings, probes, factors, recon,
                              interp, man, baselines, diagnostics, guidance_scale=model.guidance_scale)
    return write_json(out / "metrics.json", result.to_json())


def baselines_section(run: Path, scans: ScanCache, df: pd.DataFrame, cfg: dict, bs: int,
                      seed: int) -> dict[str, BaselineResult | None]:
    """Probes (and reconstruction for the voxel DAE) of the baselines found in the run folder."""
    from ldae.baselines.supervised import load_supervised
    from ldae.baselines.voxel_dae import load_voxel_dae
    from ldae.errors import CheckpointError
    from ldae.runs import find_checkpoint

    out: dict[str, BaselineResult | None] = {}
    rows = df.index.tolist()
    for name, loader in (("voxel_dae", load_voxel_dae), ("supervised", load_supervised)):
        try:
            ckpt = find_checkpoint(run, name)
        except (CheckpointError, KeyError):
            out[name] = None
            continue
        model = loader(ckpt, scans.device)
        X = embed(model.semantic, scans, rows, bs, f"{name} embeddings")
        probe = probe_section({name: X}, df, seed)[name]
        recon: dict[str, ReconstructionScores] | None = None
        if hasattr(model, "reconstruct"):
            test_rows = df.index[df["split"] == "test"].tolist()
            steps_list = [int(s) for s in cfg["reconstruction"]["steps"]]
            recon = {}
            for steps in steps_list:
                t0 = time.perf_counter()
                vals = []
                for i in test_rows:
                    x = scans.get(i)
                    with torch.no_grad():
                        vals.append({k: float(v[0]) for k, v in scores(model.reconstruct(x, steps), x).items()})
                mean = {k: float(np.mean([v[k] for v in vals])) for k in ("ssim", "mse", "psnr")}
                recon[str(steps)] = ReconstructionScores(**mean, lpips=None, seconds_per_scan=(
                    time.perf_counter() - t0) / max(len(test_rows), 1))
        out[name] = BaselineResult(probe, recon)
    return out
