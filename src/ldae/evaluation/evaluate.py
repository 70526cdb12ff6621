"""``ldae evaluate``: every number of the paper's tables on any cohort, plus the quantified extras.

Sections (each writes CSVs/PNGs into ``out`` and a block of ``metrics.json``):

* ``reconstruction``: test split; AutoencoderKL, LDDIM encoded (DDIM inversion without semantics),
  LDAE encoded, LDAE semantic-only (random z_T) at each DDIM step count, and its control with another
  subject's y_sem (same z_T, largest step count); SSIM (3D Gaussian σ=1.5,
  data range 1), MSE, PSNR against the input scan, LPIPS when local perceptual weights exist (else
  ``null`` with the reason), seconds per scan.
* ``probe``: linear probes (AD vs CN, age) on frozen y_sem of the learned encoder, of an untrained
  (randomly initialised, same architecture) encoder, and of an oracle (true regional volumes + age for
  AD vs CN; volumes alone for age, since age would predict itself) when the cohort has ground truth; and
  a reference: the first ``probes.latent_pca_components`` principal components of the autoencoder's
  latents (what the compressed latent carries linearly at this resolution).
* ``factors``: what y_sem encodes — a ridge probe per known factor column (``probes.factors``: ground-truth
  volumes, age), test-split R² for the learned and the untrained encoder and the latent PCA.
* ``interpolation``: missing-timepoint prediction over all (start, target, end) triplets of test
  subjects: LDAE (LERP y_sem, SLERP z_T at t = months ratio) vs nearest visit vs LERP of AE latents,
  scored against the autoencoder's reconstruction of the target.
* ``manipulation``: CN test scans moved towards AD (+α) and AD scans towards CN (−α) along the AD-vs-CN
  probe's direction; ventricle/hippocampus volume change (%) vs α = 0 by atlas propagation
  (:mod:`ldae.evaluation.volumetry`), and the same volumetry checked against ground truth when present.
* ``baselines``: the voxel-space DAE and the supervised encoder, when the run holds them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ldae.errors import LDAEError
from ldae.io import write_csv, write_json, write_npz

log = logging.getLogger(__name__)
GT_VOLUMES = ("ventricle_volume_ml", "hippocampus_volume_ml", "brain_volume_ml")


# ----------------------------------------------------------------------------------------- helpers
def _progress(items: list, description: str) -> Any:
    from rich.progress import track

    return track(items, description=description, transient=True)


class ScanCache:
    """Model-ready volumes of cohort rows, loaded once."""

    def __init__(self, df: pd.DataFrame, spacing: Any, shape: tuple[int, ...], device: str) -> None:
        from ldae.data.transforms import volume_transforms

        self.df = df
        self.transform = volume_transforms(spacing, shape)
        self.device = device
        self._cache: dict[int, tuple[torch.Tensor, np.ndarray]] = {}

    def get(self, i: int) -> torch.Tensor:
        """``(1, 1, D, H, W)`` volume of row label ``i``."""
        if i not in self._cache:
            vol = self.transform({"image": self.df.loc[i, "path"]})["image"]
            self._cache[i] = (vol.as_tensor()[None].to(self.device), np.asarray(vol.affine, dtype=np.float64))
        return self._cache[i][0]

    def affine(self, i: int) -> np.ndarray:
        self.get(i)
        return self._cache[i][1]

    def batch(self, rows: list[int]) -> torch.Tensor:
        return torch.cat([self.get(i) for i in rows])


def embed(fn: Callable[[torch.Tensor], torch.Tensor], scans: ScanCache, rows: list[int], batch_size: int,
          description: str) -> np.ndarray:
    """``fn`` (volumes -> vectors) over cohort rows, batched; ``(n, d)`` float64."""
    out = []
    chunks = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    for chunk in _progress(chunks, description):
        with torch.no_grad():
            out.append(fn(scans.batch(chunk)).double().cpu().numpy())
    return np.concatenate(out)


def _scores(pred: torch.Tensor, ref: torch.Tensor) -> dict[str, np.ndarray]:
    from ldae.metrics import reconstruction_metrics

    return {k: v.detach().cpu().numpy() for k, v in reconstruction_metrics(pred.float(), ref.float()).items()}


# ----------------------------------------------------------------------------------------- sections
def probe_section(features: dict[str, np.ndarray], df: pd.DataFrame, seed: int) -> dict[str, Any]:
    """AD-vs-CN and age probes for each feature set (name -> (n, d) aligned with ``df``)."""
    from ldae.evaluation.probes import probe_ad_vs_cn, probe_age, scalar_metrics

    out: dict[str, Any] = {}
    cols = {"diagnosis": df["diagnosis"].to_numpy(), "split": df["split"].to_numpy(),
            "subject": df["subject"].to_numpy()}
    for name, X in features.items():
        X_age = X
        if name == "oracle":  # age must not predict itself: volumes only for the age probe
            X_age = X[:, :-1]
        ad = probe_ad_vs_cn(X, cols["diagnosis"], cols["split"], cols["subject"], seed=seed)
        age = probe_age(X_age, df["age"].to_numpy(), cols["split"], cols["subject"], seed=seed)
        out[name] = {"ad_vs_cn": scalar_metrics(ad), "age": scalar_metrics(age), "_fit": (ad, age)}
    return out


def factor_section(features: dict[str, np.ndarray], df: pd.DataFrame, factors: list[str], seed: int) -> dict[str, Any]:
    """What the embeddings encode: a ridge probe per known per-scan factor (a cohort column: ground-truth
    volumes, age, ...) for each feature set, with the test-split R² and MAE. Columns absent from the
    cohort, or not numeric and finite on every row, are listed under ``skipped``."""
    from ldae.evaluation.probes import probe_regression

    usable: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    for col in factors:
        if col not in df.columns:
            skipped[col] = "not a cohort column"
            continue
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
        if np.isfinite(values).all():
            usable[col] = values
        else:
            skipped[col] = "missing or non-numeric values"
    out: dict[str, Any] = {name: {} for name in features}
    for name, X in features.items():
        for col, values in usable.items():
            r = probe_regression(X, values, df["split"].to_numpy(), df["subject"].to_numpy(),
                                 seed=seed, what=f"{col} probe ({name})", target=col)
            out[name][col] = {k: r[k] for k in ("r2", "mae", "mae_ci95", "cv_mae_best", "alpha", "n_train", "n_test")}
    out["skipped"] = skipped
    return out


def reconstruction_section(model: Any, scans: ScanCache, test_rows: list[int], steps_list: list[int],
                           batch_size: int, seed: int, lpips: Callable | None) -> tuple[dict, pd.DataFrame]:
    """Paper table 6 on the test rows; returns (metrics block, per-scan table)."""
    records: list[dict[str, Any]] = []
    block: dict[str, Any] = {}
    chunks = [test_rows[i : i + batch_size] for i in range(0, len(test_rows), batch_size)]

    def run(method: str, steps: int | None, fn: Callable[[torch.Tensor, list[int]], torch.Tensor]) -> None:
        values: dict[str, list] = {"ssim": [], "mse": [], "psnr": [], "lpips": []}
        seconds = 0.0
        for chunk in _progress(chunks, f"{method}{'' if steps is None else f' ({steps} steps)'}"):
            x = scans.batch(chunk)
            start = time.perf_counter()
            with torch.no_grad():
                pred = fn(x, chunk)
            seconds += time.perf_counter() - start
            s = _scores(pred, x)
            lp = lpips(pred, x).cpu().numpy() if lpips is not None else [None] * len(chunk)
            for j, row in enumerate(chunk):
                rec = {"method": method, "steps": steps, "row": row, "ssim": float(s["ssim"][j]),
                       "mse": float(s["mse"][j]), "psnr": float(s["psnr"][j]),
                       "lpips": None if lp[j] is None else float(lp[j])}
                records.append(rec)
                for k in values:
                    values[k].append(rec[k])
        summary = {k: float(np.mean(values[k])) for k in ("ssim", "mse", "psnr")}
        summary["lpips"] = None if lpips is None else float(np.mean(values["lpips"]))
        summary["seconds_per_scan"] = seconds / max(len(test_rows), 1)
        if steps is None:
            block[method] = summary
        else:
            block.setdefault(method, {})[str(steps)] = summary

    run("autoencoder", None, lambda x, _: model.decompress(model.compress(x)))
    for steps in steps_list:
        run("lddim_encoded", steps, lambda x, _, s=steps: model.decode(None, model.encode(x, s, semantic=False)[1], s))
        run("ldae_encoded", steps, lambda x, _, s=steps: model.decode(*model.encode(x, s), s))
        run("ldae_semantic", steps, lambda x, _, s=steps: model.semantic_only(x, s, seed=seed))
    # Control for the semantic-only row: the same random z_T decoded with y_sem of *another* subject's test
    # scan. The SSIM gap between the two is what y_sem says about this particular brain.
    donor = other_subject_rows(test_rows, scans.df["subject"])
    if donor is not None:
        top = max(steps_list)

        def with_other_y(x: torch.Tensor, rows: list[int]) -> torch.Tensor:  # same z_T as ldae_semantic
            return model.semantic_only(x, top, seed=seed, y_sem=model.semantic(scans.batch([donor[r] for r in rows])))

        run("ldae_semantic_other", top, with_other_y)
    return block, pd.DataFrame.from_records(records)


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


def interpolation_section(model: Any, scans: ScanCache, df: pd.DataFrame, steps: int,
                          max_triplets: int | None) -> tuple[dict, pd.DataFrame]:
    """Missing-timepoint prediction on test subjects with >= 3 sessions."""
    from ldae.diffusion.interpolation import lerp, slerp
    from ldae.evaluation.longitudinal import (
        enumerate_triplets,
        nearest_visit_baseline,
        summarize_triplet_scores,
    )

    test = df[df["split"] == "test"]
    triplets = enumerate_triplets(test)
    if max_triplets is not None and len(triplets) > max_triplets:
        triplets = triplets.sample(n=int(max_triplets), random_state=0).sort_index()
    if triplets.empty:
        return {m: {"ssim": None, "mse": None, "n_triplets": 0} for m in ("ldae", "nearest_visit", "latent_lerp")}, triplets
    needed = sorted(set(triplets[["start_index", "target_index", "end_index"]].to_numpy().ravel().tolist()))
    enc: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    latent: dict[int, torch.Tensor] = {}
    ae_recon: dict[int, torch.Tensor] = {}
    for i in _progress(needed, f"encoding visits ({steps} steps)"):
        x = scans.get(i)
        with torch.no_grad():
            enc[i] = model.encode(x, steps)
            latent[i] = model.compress(x)
            ae_recon[i] = model.decompress(latent[i])
    records = []
    for tr in _progress(list(triplets.itertuples(index=False)), "predicting missing visits"):
        s, g, e, t = int(tr.start_index), int(tr.target_index), int(tr.end_index), float(tr.t)
        (ys, zs), (ye, ze) = enc[s], enc[e]
        with torch.no_grad():
            preds = {
                "ldae": model.decode(lerp(ys, ye, t), slerp(zs, ze, t), steps),
                "nearest_visit": nearest_visit_baseline(ae_recon[s], ae_recon[e], t),
                "latent_lerp": model.decompress(lerp(latent[s], latent[e], t)),
            }
        for method, pred in preds.items():
            sc = _scores(pred, ae_recon[g])
            records.append({**tr._asdict(), "method": method, "ssim": float(sc["ssim"][0]), "mse": float(sc["mse"][0])})
    scores = pd.DataFrame.from_records(records)
    summary = summarize_triplet_scores(scores, metrics=["ssim", "mse"])
    return summary, scores


def _monotonic(values: list[float]) -> bool:
    """True when the sequence never changes direction."""
    d = np.diff(np.asarray(values, dtype=float))
    return bool(np.all(d >= 0) or np.all(d <= 0))


def manipulation_section(model: Any, scans: ScanCache, df: pd.DataFrame, direction: np.ndarray,
                         mcfg: dict, out: Path) -> dict[str, Any]:
    """Regional volume change along the AD direction (CN -> AD with +α, AD -> CN with −α)."""
    from ldae.evaluation.volumetry import VolumetryConfig, measure_volumes_batch

    vcfg = VolumetryConfig.from_dict(mcfg.get("volumetry"))
    alphas = [float(a) for a in mcfg["alphas"]]
    test = df[df["split"] == "test"]
    result: dict[str, Any] = {"alphas": alphas, "direction": "unit AD-vs-CN probe direction in normalised y_sem"}
    strips: dict[str, tuple[list, list]] = {}
    for name, source, sign in (("cn_to_ad", "CN", 1.0), ("ad_to_cn", "AD", -1.0)):
        rows = test.index[test["diagnosis"] == source].tolist()[: int(mcfg["max_scans"])]
        if not rows:
            result[name] = {"n_scans": 0}
            continue
        items, keys = [], []
        for i in _progress(rows, f"manipulating {source} scans"):
            vols = model.manipulate(scans.get(i), direction, [sign * a for a in alphas], int(mcfg["steps"]))
            if i == rows[0]:
                strips[name] = ([scans.get(i)[0], *[v[0] for v in vols]], ["input", *[f"α={sign * a:+.1f}" for a in alphas]])
            for a, v in zip(alphas, vols):
                items.append((v[0, 0].cpu().numpy(), scans.affine(i)))
                keys.append((i, a))
        measured = measure_volumes_batch(items, vcfg, workers=1)
        table = pd.DataFrame([{"row": k[0], "alpha": k[1], **{r: m[f"{r}_ml"] for r in ("ventricle", "hippocampus")}}
                              for k, m in zip(keys, measured)])
        base = table[table["alpha"] == alphas[0]].set_index("row")
        per_alpha = {}
        for a in alphas:
            cur = table[table["alpha"] == a].set_index("row")
            change = {r: float(((cur[r] - base[r]) / base[r]).mean() * 100.0) for r in ("ventricle", "hippocampus")}
            per_alpha[f"{a:g}"] = {"ventricle_change_pct": change["ventricle"],
                                   "hippocampus_change_pct": change["hippocampus"]}
        vent = [per_alpha[f"{a:g}"]["ventricle_change_pct"] for a in alphas]
        hip = [per_alpha[f"{a:g}"]["hippocampus_change_pct"] for a in alphas]
        result[name] = {**per_alpha, "n_scans": len(rows),
                        "ventricle_monotonic": _monotonic(vent), "hippocampus_monotonic": _monotonic(hip)}
        write_csv(out / f"manipulation_{name}.csv", table)
    from ldae.viz import save_strip

    for name, (vols, labels) in strips.items():
        save_strip(out / f"manipulation_{name}.png", vols, labels, diff_to=1, title=name.replace("_", " → "))
    return result


def figures_section(model: Any, scans: ScanCache, df: pd.DataFrame, out: Path, steps: int, seed: int) -> None:
    """Stochastic variations of a test scan and an interpolation strip between two visits of a test subject."""
    from ldae.viz import save_mosaic, save_strip

    test = df[df["split"] == "test"].sort_values(["subject", "session"])
    first = int(test.index[0])
    x = scans.get(first)
    var = model.variations(x, 3, steps, seed=seed)
    rows = [("input", x[0]), ("LDAE reconstruction", model.reconstruct(x, steps)[0])]
    rows += [(f"variation {i}", var[i, 0]) for i in range(3)]
    rows.append(("|variation 0 - variation 1|", (var[0, 0] - var[1, 0]).abs()))
    save_mosaic(out / "variations.png", rows, title=f"{df.loc[first, 'subject']}: fixed y_sem, new z_T")
    counts = test.groupby("subject").size()
    subject = counts.idxmax()
    visits = test[test["subject"] == subject]
    if len(visits) >= 2:
        a, b = int(visits.index[0]), int(visits.index[-1])
        ts = [0.0, 0.25, 0.5, 0.75, 1.0]
        vols = model.interpolate(scans.get(a), scans.get(b), ts, steps)
        m0, m1 = int(df.loc[a, "session"]), int(df.loc[b, "session"])
        labels = [f"M{m0:02d} (input)", *[f"t={t:.2f} (~M{m0 + t * (m1 - m0):.0f})" for t in ts], f"M{m1:02d} (input)"]
        save_strip(out / "interpolation_strip.png", [scans.get(a)[0], *[v[0] for v in vols], scans.get(b)[0]],
                   labels, diff_to=1, title=f"{subject}: LERP y_sem, SLERP z_T")


def volumetry_check(scans: ScanCache, df: pd.DataFrame, mcfg: dict, max_scans: int = 8) -> dict[str, Any] | None:
    """Correlation of atlas-propagation volumes with the ground-truth columns on real test scans."""
    if not all(c in df.columns for c in GT_VOLUMES[:2]):
        return None
    from ldae.evaluation.volumetry import VolumetryConfig, measure_volumes_batch

    rows = df.index[df["split"] == "test"].tolist()[:max_scans]
    if len(rows) < 3:
        return None
    measured = measure_volumes_batch([(scans.get(i)[0, 0].cpu().numpy(), scans.affine(i)) for i in rows],
                                     VolumetryConfig.from_dict(mcfg.get("volumetry")), workers=1)
    out: dict[str, Any] = {"n_scans": len(rows)}
    for region in ("ventricle", "hippocampus"):
        m = np.array([r[f"{region}_ml"] for r in measured])
        gt = df.loc[rows, f"{region}_volume_ml"].to_numpy(dtype=float)
        out[f"{region}_pearson_r"] = float(np.corrcoef(m, gt)[0, 1]) if m.std() > 0 and gt.std() > 0 else None
    return out


def _lpips(rcfg: dict, device: str) -> tuple[Callable, str]:
    """Per-sample 2.5D LPIPS from local weights (``reconstruction.lpips_network``/``lpips_weights``)."""
    from ldae.nets.perceptual import build_perceptual_loss

    setup = build_perceptual_loss({"perceptual_weight": 1.0, "perceptual_network": rcfg.get("lpips_network", "squeeze"),
                                   "perceptual_weights": rcfg["lpips_weights"], "perceptual_fake_3d_ratio": 1.0})
    if setup.loss is None:
        return None, f"unavailable: {setup.status}"  # type: ignore[return-value]
    net = setup.loss.to(device)

    def fn(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([net(pred[i : i + 1], ref[i : i + 1]).reshape(()) for i in range(pred.shape[0])])

    return fn, f"2.5D LPIPS: {setup.status}"


# ----------------------------------------------------------------------------------------- entry point
def evaluate(run: str | Path, csv: str | Path, out: str | Path, cfg: dict | None = None,
             overrides: list | tuple = ()) -> Path:
    """Run the whole suite; return the path of ``out/metrics.json``."""
    from ldae.checkpoints import load_checkpoint
    from ldae.config import apply_overrides, load_preset, save_config
    from ldae.data.cohort import ensure_split, read_cohort
    from ldae.distributed import resolve_device
    from ldae.evaluation.plots import plot_lda, plot_manipulation, plot_triplet_scores
    from ldae.evaluation.probes import lda_projection, pca_features, save_probes
    from ldae.model import LDAE
    from ldae.nets.semantic_encoder import build_semantic_encoder

    run, out = Path(run), Path(out)
    if cfg is None:
        from ldae.runs import find_checkpoint

        preset = load_checkpoint(find_checkpoint(run, "representation"), "representation")["ldae"].get("preset") or "paper"
        cfg = load_preset(preset, "evaluation")
    cfg = apply_overrides(cfg, list(overrides))
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    seed, bs, device = int(cfg.get("seed", 0)), int(cfg["batch_size"]), resolve_device(str(cfg.get("device", "auto")))
    model = LDAE.load(run, device=device)
    df = ensure_split(read_cohort(csv), seed=seed)
    scans = ScanCache(df, model.spacing, model.shape, device)
    all_rows = df.index.tolist()
    test_rows = df.index[df["split"] == "test"].tolist()
    if not test_rows:
        raise LDAEError(f"{csv}: the test split is empty")
    metrics: dict[str, Any] = {"cohort": {"csv": str(csv), "scans": len(df), "test_scans": len(test_rows)},
                               "timings_s": {}}

    # ---- probes
    t0 = time.perf_counter()
    learned = embed(model.semantic, scans, all_rows, bs, "y_sem (learned encoder)")
    torch.manual_seed(int(cfg["probes"]["untrained_seed"]))
    enc_cfg = load_checkpoint(model.checkpoints["representation"], "representation")["ldae"]["config"]["model"]["semantic_encoder"]
    untrained_net = build_semantic_encoder(enc_cfg, load_pretrained=False).to(device).eval()
    untrained = embed(untrained_net, scans, all_rows, bs, "y_sem (untrained encoder)")
    features = {"learned": learned, "untrained": untrained}
    if cfg["probes"].get("latent_pca_components"):
        latents = embed(lambda x: model.compress(x).flatten(1), scans, all_rows, bs, "latents (PCA control)")
        features["latent_pca"] = pca_features(latents, (df["split"] == "train").to_numpy(),
                                              int(cfg["probes"]["latent_pca_components"]))
    if all(c in df.columns for c in GT_VOLUMES):
        features["oracle"] = np.column_stack([df[c].to_numpy(dtype=float) for c in GT_VOLUMES] + [df["age"].to_numpy(dtype=float)])
    probes = probe_section(features, df, seed)
    ad_fit, age_fit = probes["learned"].pop("_fit")
    for v in probes.values():
        v.pop("_fit", None)
    save_probes(out / "probes.json", ad_fit, age_fit)
    write_npz(out / "embeddings.npz", y_sem=learned, untrained=untrained, index=np.asarray(all_rows))
    metrics["probe"] = probes
    metrics["factors"] = factor_section({k: v for k, v in features.items() if k != "oracle"}, df,
                                        list(cfg["probes"].get("factors") or []), seed)
    plot_lda(out / "lda.png", lda_projection(learned, df["diagnosis"].to_numpy(), (df["split"] == "train").to_numpy()),
             df["diagnosis"].to_numpy(), split=df["split"].to_numpy())
    metrics["timings_s"]["probes"] = time.perf_counter() - t0

    # ---- reconstruction
    t0 = time.perf_counter()
    rcfg = cfg["reconstruction"]
    rec_rows = test_rows[: rcfg["max_scans"]] if rcfg.get("max_scans") else test_rows
    lpips_fn = None
    metrics["lpips_status"] = "unavailable: no local perceptual weights (reconstruction.lpips_weights)"
    if rcfg.get("lpips_weights"):
        lpips_fn, metrics["lpips_status"] = _lpips(rcfg, device)
    recon, recon_table = reconstruction_section(model, scans, rec_rows, [int(s) for s in rcfg["steps"]], bs, seed, lpips_fn)
    metrics["reconstruction"] = recon
    metrics["reconstruction_note"] = "SSIM: 3D Gaussian window sigma 1.5 (truncate 3.5), data range 1; all vs the input scan"
    write_csv(out / "reconstruction.csv", recon_table)
    metrics["timings_s"]["reconstruction"] = time.perf_counter() - t0

    # ---- interpolation / missing timepoints
    t0 = time.perf_counter()
    icfg = cfg["interpolation"]
    interp, scores = interpolation_section(model, scans, df, int(icfg["steps"]), icfg.get("max_triplets"))
    metrics["interpolation"] = interp
    if not scores.empty:
        write_csv(out / "interpolation_triplets.csv", scores)
        plot_triplet_scores(out / "interpolation.png", interp)
    metrics["timings_s"]["interpolation"] = time.perf_counter() - t0

    # ---- manipulation
    t0 = time.perf_counter()
    mcfg = cfg["manipulation"]
    metrics["manipulation"] = manipulation_section(model, scans, df, np.asarray(ad_fit["coef"]), mcfg, out)
    metrics["manipulation"]["volumetry_check"] = volumetry_check(scans, df, mcfg)
    man = metrics["manipulation"]
    changes = {f"{region} ({name.replace('_to_', '→').upper()})": [man[name][f"{a:g}"][f"{region}_change_pct"]
                                                                   for a in man["alphas"]]
               for name in ("cn_to_ad", "ad_to_cn") if man[name].get("n_scans")
               for region in ("ventricle", "hippocampus")}
    if changes:
        plot_manipulation(out / "manipulation_volumes.png", man["alphas"], changes)
    metrics["timings_s"]["manipulation"] = time.perf_counter() - t0

    # ---- qualitative figures for the report
    t0 = time.perf_counter()
    figures_section(model, scans, df, out, int(icfg["steps"]), seed)
    metrics["timings_s"]["figures"] = time.perf_counter() - t0

    # ---- baselines
    metrics["baselines"] = baselines_section(run, scans, df, cfg, bs, seed) if cfg["baselines"]["enabled"] else {}
    return write_json(out / "metrics.json", metrics)


def baselines_section(run: Path, scans: ScanCache, df: pd.DataFrame, cfg: dict, bs: int, seed: int) -> dict[str, Any]:
    """Probes (and reconstruction for the voxel DAE) of the baselines found in the run folder."""
    from ldae.errors import CheckpointError
    from ldae.runs import find_checkpoint

    out: dict[str, Any] = {}
    rows = df.index.tolist()
    for name, module_name, loader in (("voxel_dae", "ldae.baselines.voxel_dae", "load_voxel_dae"),
                                      ("supervised", "ldae.baselines.supervised", "load_supervised")):
        try:
            ckpt = find_checkpoint(run, name)
        except (CheckpointError, KeyError):
            out[name] = None
            continue
        import importlib

        model = getattr(importlib.import_module(module_name), loader)(ckpt, scans.device)
        X = embed(model.semantic, scans, rows, bs, f"{name} embeddings")
        block = probe_section({name: X}, df, seed)[name]
        block.pop("_fit", None)
        entry: dict[str, Any] = {"probe": block}
        if hasattr(model, "reconstruct"):
            test_rows = df.index[df["split"] == "test"].tolist()
            steps_list = [int(s) for s in cfg["reconstruction"]["steps"]]
            recon: dict[str, Any] = {}
            for steps in steps_list:
                t0 = time.perf_counter()
                vals = []
                for i in test_rows:
                    x = scans.get(i)
                    with torch.no_grad():
                        vals.append({k: float(v[0]) for k, v in _scores(model.reconstruct(x, steps), x).items()})
                recon[str(steps)] = {k: float(np.mean([v[k] for v in vals])) for k in ("ssim", "mse", "psnr")}
                recon[str(steps)]["lpips"] = None
                recon[str(steps)]["seconds_per_scan"] = (time.perf_counter() - t0) / max(len(test_rows), 1)
            entry["reconstruction"] = recon
        out[name] = entry
    return out
