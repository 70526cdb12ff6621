"""Network micro-benchmarks at batch 1: the device's matmul peak, one latent-UNet step (fp32, bf16 autocast,
channels-last-3d), the LDAE conditional step with a shared encoder pass, and the autoencoder decode.

Every model call goes through the library's own code: the UNet module, :func:`ldae.diffusion.pdae.guided_eps_fn`
(the conditional ε̂ that :class:`ldae.model.LDAE` samples with) and the autoencoder's own ``decode``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ldae.jobs.bench.measure import PeakMemory, diffs, max_abs, time_call, time_pair
from ldae.jobs.bench.options import BenchOptions

Tensor = torch.Tensor


def bf16_unsupported(device: torch.device) -> bool:
    """True on a CUDA device without bf16 (CPU autocast always offers bf16, emulated where the ISA lacks it)."""
    return device.type == "cuda" and not torch.cuda.is_bf16_supported()


#: longest a single timed matmul of the GEMM peak may take; a slower dtype is timed on a smaller matrix
GEMM_CALL_BUDGET_S = 0.5
#: matrix size of the probe call that estimates a dtype's speed before the full-size runs
GEMM_PROBE_SIZE = 256


def _gemm_size_within_budget(a: Tensor, b: Tensor, size: int, device: torch.device) -> int:
    """The largest ``size / 2^k`` (at least ``GEMM_PROBE_SIZE``, or ``size`` if smaller) whose matmul is
    expected to take at most ``GEMM_CALL_BUDGET_S``, from one timed call at ``GEMM_PROBE_SIZE`` (time ∝ n³).

    Why: a CPU without native bf16 (AVX2) emulates it at ~1 GFLOP/s (measured 1.3 against 57 in fp32 on a
    2-core AMD EPYC): 21 bf16 matmuls of 2048 took minutes, and the benchmark's test ran for over 15."""
    n0 = min(GEMM_PROBE_SIZE, size)
    x, y = a[:n0, :n0].contiguous(), b[:n0, :n0].contiguous()
    per_call = max(time_call(lambda: x @ y, device, repeats=1, warmup=1)["min_s"], 1e-9)
    n = size
    while n > n0 and per_call * (n / n0) ** 3 > GEMM_CALL_BUDGET_S:
        n //= 2
    return max(n, n0)


def bench_gemm(device: torch.device, size: int, repeats: int) -> dict:
    """Practical matmul peak (GFLOP/s, fastest of ``repeats``) in fp32 and bf16.

    bf16 is timed at ``size`` unless one call would exceed ``GEMM_CALL_BUDGET_S`` (emulated bf16): then on the
    largest halving of ``size`` that fits, reported as ``bf16_size`` with a note (a lower bound of the peak,
    which a larger matrix would raise only slightly when the arithmetic itself is the bottleneck)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(device) for _ in range(2))
    flop = 2.0 * size**3
    out: dict[str, Any] = {"size": size}
    out["fp32_gflops"] = flop / time_call(lambda: a @ b, device, repeats, warmup=1)["min_s"] / 1e9
    if bf16_unsupported(device):
        out["bf16_gflops"], out["bf16_note"] = None, "bf16 not supported by this GPU"
    else:
        a16, b16 = a.bfloat16(), b.bfloat16()
        n = _gemm_size_within_budget(a16, b16, size, device)
        if n < size:
            a16, b16 = a16[:n, :n].contiguous(), b16[:n, :n].contiguous()
            out["bf16_size"] = n
            out["bf16_note"] = (f"timed at {n}x{n}: a {size}x{size} bf16 matmul would take over "
                                f"{GEMM_CALL_BUDGET_S:g} s here (bf16 emulated?)")
        out["bf16_gflops"] = 2.0 * n**3 / time_call(lambda: a16 @ b16, device, repeats, warmup=1)["min_s"] / 1e9
    if device.type == "cuda":
        out["fp32_note"] = f"TF32 matmul {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
    return out


def bench_unet(unet: nn.Module, z: Tensor, t: Tensor, gflop: float, peak: float | None, opts: BenchOptions,
               device: torch.device) -> dict:
    """fp32 eager latency of one ε_θ evaluation and its GFLOP/s."""
    from ldae.nets.unet import count_parameters

    timing = time_call(lambda: unet(z, t), device, opts.repeats, opts.warmup)
    out = {"params": count_parameters(unet), "latent_shape": list(z.shape[1:]), "gflop": gflop, **timing}
    out["gflops"] = gflop / timing["s"]
    out["fraction_of_fp32_peak"] = out["gflops"] / peak if peak else None
    return out


def bench_variants(unet: nn.Module, z: Tensor, t: Tensor, opts: BenchOptions, device: torch.device) -> dict:
    """bf16 autocast and channels-last-3d, each timed alternately with fp32 eager: latency, speedup (fastest
    fp32 run / fastest variant run), output difference."""
    ref = unet(z, t)
    out: dict[str, Any] = {}

    def fp32() -> Tensor:
        return unet(z, t)

    if bf16_unsupported(device):
        out["bf16_autocast"] = {"status": "skipped", "reason": "bf16 not supported by this GPU"}
    else:
        def bf16() -> Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return unet(z, t)
        base, timing, speedup = time_pair(fp32, bf16, device, opts.repeats, opts.warmup)
        out["bf16_autocast"] = {"status": "ok", **timing, "fp32_s": base["s"], "speedup": speedup,
                                **diffs(bf16(), ref)}
    cl = torch.channels_last_3d
    z_cl = z.contiguous(memory_format=cl)
    unet_cl = copy.deepcopy(unet).to(memory_format=cl)  # a copy, so that the two can alternate

    def channels_last() -> Tensor:
        return unet_cl(z_cl, t)

    base, timing, speedup = time_pair(fp32, channels_last, device, opts.repeats, opts.warmup)
    out["channels_last_3d"] = {"status": "ok", **timing, "fp32_s": base["s"], "speedup": speedup,
                               **diffs(channels_last(), ref)}
    return out


def bench_shared(model: Any, z: Tensor, t: Tensor, gflop: dict, opts: BenchOptions, device: torch.device) -> dict:
    """The LDAE conditional step as LDAE samples with it (:func:`guided_eps_fn`: one UNet encoder pass, two
    decoders) against two full passes (ε_θ, then G_ψ with its own encoder pass)."""
    from ldae.diffusion.pdae import guided_eps_fn

    unet, shift, schedule = model.unet, model.shift, model.schedule
    y = torch.randn(1, int(model.encoder.emb_dim), generator=torch.Generator().manual_seed(opts.seed)).to(device)
    shared = guided_eps_fn(unet, shift, schedule, y)
    scale = (1.0 - schedule.gather(schedule.alphas_cumprod, t, like=z)).sqrt()

    def separate() -> Tensor:
        eps = unet(z, t)
        _, skips, emb = unet.encode(z, t)  # G_ψ's own encoder pass
        return eps - scale * shift(skips, t, y, emb)

    b, a, ratio = time_pair(separate, lambda: shared(z, t), device, opts.repeats, opts.warmup)
    return {"shared": {**a, "gflop": gflop["conditional_step_shared"]},
            "separate": {**b, "gflop": gflop["conditional_step_separate"]},
            "ratio": ratio,  # fastest separate / fastest shared, timed alternately
            "flop_ratio": gflop["conditional_step_separate"] / gflop["conditional_step_shared"],
            "max_abs_diff": max_abs(shared(z, t), separate())}


def bench_decode(model: Any, opts: BenchOptions, device: torch.device, gflop: float) -> dict:
    """The autoencoder's ``decode`` of one latent to full resolution (what :meth:`LDAE.decompress` runs, before
    its clamp to [0, 1], so that the bf16 difference is measured on the raw output): fp32 and bf16 autocast,
    time and peak memory."""
    gen = torch.Generator().manual_seed(opts.seed)
    z = torch.randn(1, *model.latent_shape, generator=gen).to(device)
    out: dict[str, Any] = {"image_shape": list(model.shape), "gflop": gflop}

    def measure(autocast: bool) -> tuple[dict, Tensor]:
        result: dict[str, Tensor] = {}

        def call() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                result["x"] = model.autoencoder.decode(z)

        with PeakMemory(device) as peak:
            timing = time_call(call, device, opts.repeats)
        return {**timing, "gflops": gflop / timing["s"], "peak_mib": peak.peak_mib, "peak_note": peak.reason}, \
            result["x"]

    out["fp32"], ref = measure(False)
    if bf16_unsupported(device):
        out["bf16_autocast"] = {"status": "skipped", "reason": "bf16 not supported by this GPU"}
    else:
        res, x16 = measure(True)
        out["bf16_autocast"] = {"status": "ok", **res, "speedup": out["fp32"]["min_s"] / res["min_s"],
                                **diffs(x16, ref)}
    return out
