"""Reconstruction speed, LDAE against the voxel-space DAE: the models' own ``reconstruct`` (encode = DDIM
inversion, decode = DDIM sampling, N steps each way) of one full-resolution scan, timed per phase.

The phases come from the models' building blocks, instrumented on the benchmarked instance while its
``reconstruct`` runs unchanged (:meth:`ldae.jobs.bench.measure.Phases.instrument`): for LDAE ``compress``
(autoencoder encode), ``semantic`` (semantic encoder) and ``decompress`` (autoencoder decode); for the voxel
DAE its network's ``semantic``. What remains of the total is the DDIM loop (``ddim``). ``encode`` and
``decode`` are timed as well (``methods_s``).

Extrapolation to the paper's step count: fixed costs + 2 × steps × the measured per-step cost (the DDIM time
over its 2N network evaluations); FLOPs likewise.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch

from ldae.jobs.bench.measure import PeakMemory, Phases
from ldae.jobs.bench.options import BenchOptions

Tensor = torch.Tensor
Target = tuple[Any, str, str]


def ldae_targets(model: Any) -> list[Target]:
    """The :class:`ldae.model.LDAE` methods timed inside ``reconstruct`` (object, method, phase)."""
    return [(model, "compress", "autoencoder_encode"), (model, "semantic", "semantic_encoder"),
            (model, "decompress", "autoencoder_decode"), (model, "encode", "encode"), (model, "decode", "decode")]


def voxel_targets(model: Any) -> list[Target]:
    """The :class:`ldae.baselines.voxel_dae.VoxelDAE` methods timed inside ``reconstruct``."""
    return [(model.net, "semantic", "semantic_encoder"), (model, "encode", "encode"), (model, "decode", "decode")]


#: phases that are whole methods, reported apart from the additive breakdown
METHODS = ("encode", "decode")


def reconstruct_timed(model: Any, x: Tensor, steps: int, targets: Sequence[Target],
                      device: torch.device) -> tuple[Tensor, dict[str, float], dict[str, float]]:
    """``model.reconstruct(x, steps)`` with ``targets`` instrumented: ``(output, phases_s, methods_s)``;
    ``phases_s`` adds up to the total (``ddim`` = total − the instrumented building blocks)."""
    phases = Phases(device)
    with phases.instrument(targets):
        with phases("total"):
            out = model.reconstruct(x, steps=steps)
    s = dict(phases.s)
    total = s.pop("total")
    methods = {k: s.pop(k) for k in METHODS if k in s}
    s["ddim"] = max(total - sum(s.values()), 0.0)
    return out, s, methods


def bench_reconstruction(model: Any, targets: Sequence[Target], x: Tensor, opts: BenchOptions,
                         device: torch.device, fixed_gflop: float, step_gflop: float) -> dict:
    """Time ``repeats`` reconstructions (peak memory over the first); per-step cost and extrapolation."""
    runs: list[dict[str, float]] = []
    method_runs: list[dict[str, float]] = []
    peak = PeakMemory(device)
    for i in range(opts.repeats):
        if i == 0:
            with peak:
                _, phases_s, methods_s = reconstruct_timed(model, x, opts.steps, targets, device)
        else:
            _, phases_s, methods_s = reconstruct_timed(model, x, opts.steps, targets, device)
        runs.append(phases_s)
        method_runs.append(methods_s)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    total = statistics.median(sum(r.values()) for r in runs)
    evals = 2 * opts.steps  # N inversion + N sampling network evaluations
    per_step = med["ddim"] / evals
    fixed = total - med["ddim"]
    target = int(opts.paper_claim["steps"])
    return {"steps": opts.steps, "s": total, "phases_s": med,
            "methods_s": {k: statistics.median(r[k] for r in method_runs) for k in method_runs[0]},
            "per_step_s": per_step, "fixed_s": fixed, "peak_mib": peak.peak_mib, "peak_note": peak.reason,
            "gflop": fixed_gflop + evals * step_gflop,
            "extrapolated_steps": target, "extrapolated_s": fixed + 2 * target * per_step,
            "extrapolated_gflop": fixed_gflop + 2 * target * step_gflop}


def ratios(recon: dict, claim: dict) -> None:
    """Voxel DAE / LDAE ratios (measured, FLOPs, extrapolated) and the paper's claim, into ``recon``."""
    a, b = recon["ldae"], recon["voxel_dae"]
    recon["ratio"] = b["s"] / a["s"]
    recon["flop_ratio"] = b["gflop"] / a["gflop"]
    recon["extrapolated_ratio"] = b["extrapolated_s"] / a["extrapolated_s"]
    recon["extrapolated_flop_ratio"] = b["extrapolated_gflop"] / a["extrapolated_gflop"]
    recon["paper_claim"] = {**claim, "ratio": float(claim["voxel_dae_s"]) / float(claim["ldae_s"])}
