"""One benchmark run: every section not skipped, in order, into one results document (the JSON)."""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import asdict
from typing import Any

import torch

from ldae.distributed import resolve_device
from ldae.jobs.bench.compile import bench_compile
from ldae.jobs.bench.flops import network_gflop
from ldae.jobs.bench.inference import bench_decode, bench_gemm, bench_shared, bench_unet, bench_variants
from ldae.jobs.bench.measure import environment
from ldae.jobs.bench.models import build_ldae, build_voxel_dae, unet_inputs
from ldae.jobs.bench.options import BenchOptions, PresetConfigs
from ldae.jobs.bench.recommend import recommend
from ldae.jobs.bench.reconstruction import bench_reconstruction, ldae_targets, ratios, voxel_targets

log = logging.getLogger(__name__)
Tensor = torch.Tensor


def _notes(opts: BenchOptions, env: dict, device: torch.device) -> list[str]:
    on = opts.sections()
    notes = ["random networks of the preset; zero-initialised layers re-initialised so outputs are not trivially 0",
             "FLOPs: FlopCounterMode on the meta device (matmul/conv/attention only); times: median of repeats"]
    if {"recon", "voxel", "decode"} & set(on):
        notes.append("peak memory: increase over the call (CPU resident set / CUDA allocated), weights excluded")
    if {"recon", "voxel"} & set(on):
        notes.append(f"reconstructions run {opts.steps} DDIM steps each way; extrapolated per step to "
                     f"{opts.paper_claim['steps']} steps (fixed costs + 2 x steps x measured per-step cost)")
    if "train" in on:
        notes.append("training steps: the stages' LightningModules through Trainer.fit on a fixed batch on the "
                     "device (forward, backward, optimiser step, EMA; the autoencoder's discriminator step too); "
                     "peak memory there includes weights, gradients and optimiser state")
    if device.type == "cpu" and env["load_average"][0] > opts.threads:
        notes.append(f"machine busy: 1-min load average {env['load_average'][0]:.1f} on {opts.threads} thread(s): "
                     "timings are inflated and noisy" + (" (--threads 1 is steadier on a shared CPU)"
                                                         if opts.threads > 1 else ""))
    return notes


def _ldae_sections(res: dict, on: list[str], cfgs: PresetConfigs, opts: BenchOptions, device: torch.device,
                   x: Tensor) -> None:
    """The sections that use LDAE's networks (one random :class:`ldae.model.LDAE`, freed on return)."""
    gflop = res["gflop"]
    model = build_ldae(cfgs, device, opts.seed)
    z, t = unet_inputs(cfgs, device, opts.seed)
    if "unet" in on or "variants" in on:
        log.info("bench: latent UNet step %s", list(cfgs.latent_shape))
        peak = (res.get("gemm") or {}).get("fp32_gflops")
        res["unet"] = bench_unet(model.unet, z, t, gflop["unet_forward"], peak, opts, device)
        if "variants" in on:
            log.info("bench: bf16 autocast / channels-last-3d")
            variants = bench_variants(model.unet, z, t, opts, device)
            bf16, bf16_peak = variants["bf16_autocast"], (res.get("gemm") or {}).get("bf16_gflops")
            if bf16.get("status") == "ok":
                bf16["gflops"] = gflop["unet_forward"] / bf16["s"]
                bf16["fraction_of_bf16_peak"] = bf16["gflops"] / bf16_peak if bf16_peak else None
            res["unet"]["variants"] = variants
    if "shared" in on:
        log.info("bench: shared-encoder conditional step")
        res["shared_step"] = bench_shared(model, z, t, gflop, opts, device)
    if "recon" in on:
        log.info("bench: LDAE.reconstruct, %d steps each way", opts.steps)
        fixed = gflop["autoencoder_encode"] + gflop["semantic_encoder"] + gflop["autoencoder_decode"]
        res.setdefault("reconstruction", {})["ldae"] = bench_reconstruction(
            model, ldae_targets(model), x, opts, device, fixed, gflop["conditional_step_shared"])
    if "decode" in on:
        log.info("bench: autoencoder decode to %s", list(cfgs.image_shape))
        res["autoencoder_decode"] = bench_decode(model, opts, device, gflop["autoencoder_decode"])


def run_bench(opts: BenchOptions) -> dict:
    """Run every section of ``opts.sections()`` and return the results (the JSON document)."""
    device = resolve_device(opts.device)
    torch.set_num_threads(opts.threads)
    cfgs = PresetConfigs.load(opts.preset)
    started = time.perf_counter()
    env = environment(device, opts.threads)
    res: dict[str, Any] = {"preset": opts.preset, "device": str(device), "options": asdict(opts), "environment": env,
                           "notes": _notes(opts, env, device), "gflop": network_gflop(cfgs)}
    on = opts.sections()
    x = torch.rand(1, 1, *cfgs.image_shape, generator=torch.Generator().manual_seed(opts.seed)).to(device)
    with torch.no_grad():
        if "gemm" in on:
            log.info("bench: GEMM peak (%d x %d)", opts.gemm_size, opts.gemm_size)
            res["gemm"] = bench_gemm(device, opts.gemm_size, opts.gemm_repeats)
        if {"unet", "variants", "shared", "recon", "decode"} & set(on):
            _ldae_sections(res, on, cfgs, opts, device, x)
            gc.collect()  # LDAE's networks are gone before the (much larger) voxel activations
        if "voxel" in on:
            log.info("bench: VoxelDAE.reconstruct %s, %d steps each way", list(cfgs.image_shape), opts.steps)
            voxel = build_voxel_dae(cfgs, device, opts.seed)
            res.setdefault("reconstruction", {})["voxel_dae"] = bench_reconstruction(
                voxel, voxel_targets(voxel), x, opts, device, res["gflop"]["voxel_semantic_encoder"],
                res["gflop"]["voxel_unet"])
            del voxel
            gc.collect()
    recon = res.get("reconstruction", {})
    if "ldae" in recon and "voxel_dae" in recon:
        ratios(recon, opts.paper_claim)
    if "train" in on:
        from ldae.jobs.bench.train import bench_train

        del x
        res["train"] = bench_train(cfgs, opts.train, device, opts.seed)
    if "compile" in on:
        log.info("bench: torch.compile of the UNet (subprocess, at most %g s)", opts.compile_timeout_s)
        res.setdefault("unet", {})["compile"] = bench_compile(opts, device)
    elif "unet" in res:
        res["unet"]["compile"] = {"status": "skipped", "reason": "compile section skipped"}
    if {"unet", "variants", "decode", "compile"} & set(on):  # something the recommendation judges was measured
        res["recommendation"] = recommend(res, opts.recommend)
    env["load_average_end"] = list(os.getloadavg())
    res["wall_s"] = time.perf_counter() - started
    return res
