"""``diagnostics`` section: why y_sem learns (or does not learn) what the latents hold (issue 17).

Three measurements, cheap enough for the demo (a few hundred latents, a handful of timestep bands, one
fixed seed):

* **memorisation of the latent DDPM**: the denoising loss ``‖ε − ε_θ(z_t, t)‖²`` (mean over latent elements)
  per timestep band on training latents and on held-out (val + test) latents. Latent ``i`` of each set gets
  the same ``(t, ε)`` draw, so the two means differ only by the latents. ``ratio = train / held-out`` well
  below 1 means ε_θ has memorised the training latents: its posterior mean ``E[z_0 | z_t]`` is already the
  nearest training subject, and the only "gap" left for y_sem to fill is the subject's identity.
* **the posterior-mean gap G_ψ fills**, on held-out latents, per band: ``plain = ‖ε − ε_θ‖²`` against
  ``own = ‖ε − (ε_θ − k_t G_ψ(z_t, y_sem, t))‖²`` with the scan's own y_sem and ``other`` with another
  subject's (:func:`ldae.evaluation.sections.reconstruction.other_subject_rows`), ``k_t`` =
  :meth:`ldae.diffusion.schedule.NoiseSchedule.pdae_shift_coef` (the training loss's coefficient), same
  draws. ``gap_own = (plain − own) / plain`` is the fraction of the DDPM's error the semantics remove;
  ``own < other`` is what y_sem says about *this* scan rather than about brains in general. The same
  ``gap_own`` on the training latents tells memorisation (positive there, negative held out) from a G_ψ
  that fits nothing (negative on both: seen when the EMA encoder's y_sem statistics were off).
* **representation table**: test-split and nested train-split CV R² of each ground-truth factor and the
  AD-vs-CN AUC (test and train-split CV) for every feature set (learned y_sem, untrained encoder, latent
  PCA, raw-voxel PCA), all on the same split, gathered from the ``probe`` and ``factors`` sections (no refit),
  and beside them how much of the latent itself each set holds linearly (``latent_r2`` on the test split,
  ``latent_cv_r2`` in nested train-split CV: :func:`ldae.evaluation.probes.probe_latent_readout`). A learned
  y_sem whose CV value is far above its test value reproduces the latents of the scans its encoder was
  trained on, not of new ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ldae.evaluation.results import BandGap, BandLoss, DiagnosticsSection, FactorSection, ProbeSection

#: default timestep bands [lo, hi) (clipped to the schedule's T)
DEFAULT_BANDS: tuple[tuple[int, int], ...] = ((0, 50), (50, 200), (200, 500), (500, 1000))


def check_bands(bands: Sequence[Sequence[int]], T: int) -> list[tuple[int, int]]:
    """Bands as ``[lo, hi)`` integer pairs clipped to ``[0, T)``; empty ones dropped; ValueError when none is left."""
    out = []
    for band in bands:
        lo, hi = int(band[0]), min(int(band[1]), T)
        if 0 <= lo < hi:
            out.append((lo, hi))
    if not out:
        raise ValueError(f"diagnostics: no timestep band inside [0, {T}) among {list(bands)}")
    return out


def band_draws(n: int, latent_shape: Sequence[int], band: tuple[int, int], draws: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, ε)`` of shapes ``(draws, n)`` and ``(draws, n, *latent_shape)``: timesteps uniform in the band and
    standard normal noise, one per (draw, latent position): position ``i`` of any set gets the same draw."""
    t = torch.randint(band[0], band[1], (draws, n), generator=generator)
    noise = torch.randn((draws, n, *latent_shape), generator=generator)
    return t, noise


def _per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b).double() ** 2).flatten(1).mean(dim=1)


@torch.no_grad()
def denoising_errors(unet: Any, schedule: Any, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                     batch_size: int, shift: Any = None, y_sem: Sequence[torch.Tensor] = ()) -> list[np.ndarray]:
    """Per-latent ``‖ε − ε_θ(z_t, t)‖²`` (element mean) at the given draws, and, for each y in ``y_sem``,
    ``‖ε − (ε_θ − k_t G_ψ(z_t, y, t))‖²``: :func:`ldae.diffusion.pdae.unet_and_shift`'s ``(ε_θ, G_ψ)``, with
    the UNet run once per batch for all y (the ``diagnostics`` test checks the two agree exactly).

    ``z0`` ``(n, ...)``, ``t`` ``(n,)``, ``noise`` like ``z0``; returns ``[plain, *per y]`` as float64 arrays."""
    params = list(unet.parameters()) if hasattr(unet, "parameters") else []
    device = params[0].device if params else z0.device
    y_sem = list(y_sem) if shift is not None else []
    outs: list[list[torch.Tensor]] = [[] for _ in range(1 + len(y_sem))]
    for s in range(0, z0.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        z, tt, eps = z0[sl].to(device), t[sl].to(device), noise[sl].to(device, z0.dtype)
        z_t = schedule.q_sample(z, tt, eps)
        if not y_sem:
            outs[0].append(_per_sample(eps, unet(z_t, tt)).cpu())
            continue
        k = schedule.pdae_shift_coef(tt.cpu()).to(device, z.dtype).reshape(-1, *([1] * (z.ndim - 1)))
        # what unet_and_shift computes, with the UNet's encoder and decoder run once for every y_sem
        h, skips, emb = unet.encode(z_t, tt)
        e = unet.decode(h, skips, emb)
        outs[0].append(_per_sample(eps, e).cpu())
        for j, y in enumerate(y_sem, start=1):
            outs[j].append(_per_sample(eps, e - k * shift(skips, tt, y[sl].to(device, z.dtype), emb)).cpu())
    return [torch.cat(o).numpy() for o in outs]


def diagnostics_section(unet: Any, shift: Any, schedule: Any, z_train: torch.Tensor, z_held: torch.Tensor,
                        y_held: torch.Tensor, y_other: torch.Tensor | None, probes: ProbeSection | None = None,
                        factors: FactorSection | None = None, bands: Sequence[Sequence[int]] = DEFAULT_BANDS,
                        draws: int = 1, seed: int = 0, batch_size: int = 32,
                        y_train: torch.Tensor | None = None,
                        readout: dict[str, dict[str, Any]] | None = None) -> DiagnosticsSection:
    """The three diagnostics (module docstring). ``z_train``/``z_held``: scaled latents ``(n, C, D, H, W)``
    (what the DDPM was trained on, ``model.compress``); ``y_held``: y_sem of the held-out scans, ``y_other``:
    for each held-out scan the y_sem of another subject's scan (None: the ``other`` column is skipped);
    ``y_train``: y_sem of the training scans, for the gap on training latents (None: skipped); ``readout``:
    per feature set, its latent read-out (:func:`ldae.evaluation.probes.probe_latent_readout`) for the table.
    Band ``b`` draws from ``torch.Generator().manual_seed(seed + b)``: the numbers are reproducible."""
    bands_ = check_bands(bands, int(schedule.T))
    shape = tuple(z_train.shape[1:])
    n_max = max(z_train.shape[0], z_held.shape[0])
    ys = [y_held] + ([y_other] if y_other is not None else [])
    with_train_y = shift is not None and y_train is not None
    losses, gaps = [], []
    for b, band in enumerate(bands_):
        t, noise = band_draws(n_max, shape, band, int(draws), torch.Generator().manual_seed(int(seed) + b))
        tr_runs = [denoising_errors(unet, schedule, z_train, t[d, : len(z_train)], noise[d, : len(z_train)],
                                    batch_size, shift if with_train_y else None, [y_train] if with_train_y else [])
                   for d in range(draws)]
        tr = np.concatenate([r[0] for r in tr_runs])
        tr_own = np.concatenate([r[1] for r in tr_runs]) if with_train_y else None
        held = [denoising_errors(unet, schedule, z_held, t[d, : len(z_held)], noise[d, : len(z_held)], batch_size,
                                 shift, ys) for d in range(draws)]
        plain = np.concatenate([h[0] for h in held])
        own = np.concatenate([h[1] for h in held]) if shift is not None else None
        other = np.concatenate([h[2] for h in held]) if shift is not None and y_other is not None else None
        losses.append(BandLoss(list(band), float(tr.mean()), float(plain.mean()),
                               float(tr.mean() / plain.mean()) if plain.mean() > 0 else None))
        if own is not None:
            gaps.append(BandGap.from_means(list(band), float(plain.mean()), float(own.mean()),
                                           None if other is None else float(other.mean()),
                                           None if other is None else float(np.mean(own < other)),
                                           None if tr_own is None else (float(tr.mean()), float(tr_own.mean()))))
    table = representation_table(probes, factors, readout) if probes is not None and factors is not None else {}
    return DiagnosticsSection(n_train=int(z_train.shape[0]), n_held_out=int(z_held.shape[0]), draws=int(draws),
                              seed=int(seed), bands=losses, gap=gaps, representation=table)


def representation_table(probes: ProbeSection, factors: FactorSection,
                         readout: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, float | None]]:
    """Per feature set (those in both sections, in the factor section's order): test R² of each factor and
    its nested train-split CV R² (``{col}_r2``, ``{col}_cv_r2``), the AD-vs-CN test AUC and its train-split
    CV AUC (``ad_auc``, ``ad_cv_auc``), on the same split; with ``readout`` (set -> a
    :func:`ldae.evaluation.probes.probe_latent_readout` result) also ``latent_r2`` and ``latent_cv_r2``."""
    out: dict[str, dict[str, float | None]] = {}
    for name, cols in factors.fits.items():
        row: dict[str, float | None] = {}
        for col, fit in cols.items():
            row[f"{col}_r2"], row[f"{col}_cv_r2"] = fit.r2, fit.cv_r2
        if name in probes.sets:
            row["ad_auc"] = probes[name].ad_vs_cn.auc
            row["ad_cv_auc"] = probes[name].ad_vs_cn.cv_auc_best
        if readout is not None and name in readout:
            row["latent_r2"], row["latent_cv_r2"] = readout[name]["r2"], readout[name]["cv_r2"]
        out[name] = row
    return out


def subsample(rows: Sequence[int], k: int | None, seed: int) -> list[int]:
    """At most ``k`` of ``rows`` (a seeded random choice, kept in their original order); all when ``k`` is None."""
    rows = list(rows)
    if k is None or len(rows) <= int(k):
        return rows
    pick = np.sort(np.random.default_rng(seed).choice(len(rows), size=int(k), replace=False))
    return [rows[i] for i in pick]


def run_diagnostics(model: Any, df: Any, latents: np.ndarray, y_sem: np.ndarray, probes: ProbeSection,
                    factors: FactorSection, dcfg: dict, batch_size: int, seed: int,
                    features: dict[str, np.ndarray] | None = None) -> DiagnosticsSection | None:
    """:func:`diagnostics_section` of a loaded :class:`ldae.model.LDAE` on the cohort ``df``: ``latents``
    ``(n, prod(latent_shape))`` (``model.compress``) and ``y_sem`` ``(n, emb_dim)`` aligned with ``df``'s
    rows; at most ``dcfg['max_latents']`` training and as many held-out (val + test) rows, chosen with
    ``seed``. ``features`` (set name -> ``(n, d)``, aligned with ``df``): the sets whose latent read-out the
    table reports (all of ``df``'s rows, train split fit, test split scored). None when either set is empty."""
    from ldae.evaluation.probes import probe_latent_readout
    from ldae.evaluation.sections.reconstruction import other_subject_rows

    split = df["split"].astype(str).to_numpy()
    k = dcfg.get("max_latents")
    train = subsample(np.flatnonzero(split == "train").tolist(), k, seed)
    held = subsample(np.flatnonzero(np.isin(split, ("val", "test"))).tolist(), k, seed + 1)
    if not train or not held:
        return None
    device = model.device
    z = torch.as_tensor(latents, dtype=torch.float32).reshape(len(latents), *model.latent_shape)
    y = torch.as_tensor(y_sem, dtype=torch.float32)
    subject = df["subject"].reset_index(drop=True)
    donor = other_subject_rows(held, subject)
    y_other = None if donor is None else y[[donor[i] for i in held]]
    readout = {name: probe_latent_readout(X, latents, split, df["subject"].to_numpy(), seed=seed,
                                          what=f"latent read-out ({name})")
               for name, X in (features or {}).items()}
    return diagnostics_section(model.unet, model.shift, model.schedule, z[train].to(device), z[held].to(device),
                               y[held].to(device), None if y_other is None else y_other.to(device), probes, factors,
                               bands=[tuple(b) for b in dcfg.get("bands") or DEFAULT_BANDS],
                               draws=int(dcfg.get("draws", 1)), seed=seed, batch_size=batch_size,
                               y_train=y[train].to(device), readout=readout)
