"""``ldae bench``: speed and memory of a preset's networks, side by side, on the current device.

What is measured (randomly initialised networks built from the preset's stage configs; no training):

1. ``gemm`` — the device's practical matmul peak (fp32, and bf16), the yardstick for GFLOP/s.
2. ``unet`` — one ε_θ evaluation of the latent UNet (batch 1, the preset's latent shape): latency and
   achieved GFLOP/s; ``variants`` — the same under bf16 autocast and channels-last-3d, with the max |Δ| of
   the output against fp32; ``compile`` — ``torch.compile`` in a subprocess, killed past a time cap.
3. ``shared`` — the LDAE conditional step (UNet encoder once, UNet decoder + shift decoder on its features)
   against two full passes (ε_θ, then G_ψ with its own encoder pass).
4. ``recon`` / ``voxel`` — one reconstruction (encode = DDIM inversion, decode = DDIM sampling, N steps each
   way) of a full-resolution scan by LDAE (+ autoencoder encode/decode and the semantic encoder) and by the
   voxel-space DAE baseline, timed per phase; both are extrapolated per step to the paper's step count.
5. ``decode`` — autoencoder decode to full resolution: time and peak memory, fp32 and bf16 autocast.

Conventions. Layers that the networks zero-initialise (output convolutions, residual branches, attention
projections) are re-initialised with their default init so that outputs are not trivially zero (timings do
not depend on the values; precision differences do). FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` on the meta device (so attention, which the CPU kernel hides
from the counter, is included); they cover matmuls/convolutions/attention, not norms or activations.
Peak memory is the increase of the process's resident set during the call (``/proc/self/clear_refs``
resets the high-water mark; CPU) or of ``torch.cuda.max_memory_allocated`` (CUDA), above what was in use
before, i.e. activations and workspace, not weights. Times are medians over ``repeats`` runs.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldae.config import configs_root, load_config, load_preset
from ldae.distributed import resolve_device
from ldae.errors import ConfigError

log = logging.getLogger(__name__)
Tensor = torch.Tensor

SECTIONS = ("gemm", "unet", "variants", "shared", "recon", "voxel", "decode", "compile")
STAGES = ("autoencoder", "diffusion", "representation", "voxel_dae")


# ----------------------------------------------------------------------------- options and configs


@dataclass
class BenchOptions:
    """Settings of one benchmark run (defaults from ``configs/bench.yaml``, see :func:`options_from_config`)."""

    preset: str
    steps: int
    repeats: int
    warmup: int
    device: str
    threads: int
    seed: int
    gemm_size: int
    gemm_repeats: int
    compile_timeout_s: float
    paper_claim: dict
    recommend: dict
    skip: tuple[str, ...] = ()


def bench_config() -> dict:
    """The packaged ``configs/bench.yaml``."""
    return load_config(configs_root() / "bench.yaml")


def _positive_int(value: Any, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"bench setting '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def options_from_config(cfg: dict, **overrides: Any) -> BenchOptions:
    """Merge ``configs/bench.yaml`` values with non-None ``overrides`` (the command-line flags) and validate."""
    ov = {k: v for k, v in overrides.items() if v is not None}
    preset = ov.get("preset", cfg["preset"])
    steps_cfg = cfg.get("steps", {})
    steps = ov.get("steps", steps_cfg.get(preset) if isinstance(steps_cfg, dict) else steps_cfg)
    if steps is None:
        raise ConfigError(f"bench setting 'steps.{preset}' is not set in configs/bench.yaml: pass --steps N")
    threads = ov.get("threads", cfg.get("threads"))
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    skip = tuple(ov.get("skip", ()))
    if not cfg.get("compile", {}).get("enabled", True) and "compile" not in skip:
        skip += ("compile",)
    unknown = [s for s in skip if s not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown bench section(s) {', '.join(unknown)} (sections: {', '.join(SECTIONS)})")
    timeout = float(ov.get("compile_timeout_s", cfg["compile"]["timeout_s"]))
    if timeout <= 0:
        raise ConfigError(f"bench setting 'compile.timeout_s' must be > 0, got {timeout}")
    return BenchOptions(
        preset=str(preset),
        steps=_positive_int(steps, "steps"),
        repeats=_positive_int(ov.get("repeats", cfg["repeats"]), "repeats"),
        warmup=_positive_int(ov.get("warmup", cfg["warmup"]), "warmup", 0),
        device=str(ov.get("device", cfg["device"])),
        threads=_positive_int(threads, "threads"),
        seed=int(ov.get("seed", cfg.get("seed", 0))),
        gemm_size=_positive_int(cfg["gemm"]["size"], "gemm.size"),
        gemm_repeats=_positive_int(cfg["gemm"]["repeats"], "gemm.repeats"),
        compile_timeout_s=timeout,
        paper_claim=dict(cfg["paper_claim"]),
        recommend=dict(cfg["recommend"]),
        skip=skip,
    )


@dataclass
class PresetConfigs:
    """The four stage configs of a preset whose networks the bench builds."""

    preset: str
    stages: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, preset: str) -> PresetConfigs:
        out = cls(preset, {stage: load_preset(preset, stage) for stage in STAGES})
        out.check()
        return out

    def __getitem__(self, stage: str) -> dict:
        return self.stages[stage]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self["autoencoder"]["data"]["shape"])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        from ldae.nets.autoencoder import latent_shape

        return latent_shape(self["autoencoder"]["model"], list(self.image_shape))

    @property
    def emb_dim(self) -> int:
        return int(self["representation"]["model"]["semantic_encoder"]["emb_dim"])

    def check(self) -> None:
        """ConfigError unless LDAE and the voxel DAE work on the same image grid (equal-footing comparison)."""
        vox = tuple(int(s) for s in self["voxel_dae"]["data"]["shape"])
        if vox != self.image_shape:
            raise ConfigError(f"preset '{self.preset}': voxel_dae data.shape {list(vox)} differs from autoencoder "
                              f"data.shape {list(self.image_shape)}; the comparison needs the same image grid")
        slices = self["representation"]["model"]["semantic_encoder"]["num_slices"]
        if slices != self.image_shape[-1]:
            raise ConfigError(f"preset '{self.preset}': representation model.semantic_encoder.num_slices is "
                              f"{slices} but the images have {self.image_shape[-1]} axial slices")


# ----------------------------------------------------------------------------- measuring tools


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 0) -> dict:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times: ``{'s': median, 'min_s', 'runs_s'}``."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        runs.append(time.perf_counter() - t0)
    return {"s": statistics.median(runs), "min_s": min(runs), "runs_s": runs}


def time_pair(base: Callable[[], Any], other: Callable[[], Any], device: torch.device, repeats: int,
              warmup: int = 0) -> tuple[dict, dict, float]:
    """Time two calls alternately (so that a drifting machine load hits both alike):
    ``(base timing, other timing, speedup = fastest base / fastest other)``."""
    for _ in range(warmup):
        base()
        other()
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeats):
        for fn, runs in ((base, a), (other, b)):
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            runs.append(time.perf_counter() - t0)

    def summary(runs: list[float]) -> dict:
        return {"s": statistics.median(runs), "min_s": min(runs), "runs_s": runs}

    return summary(a), summary(b), min(a) / min(b)


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of ``fn()`` as counted by ``FlopCounterMode`` (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")


def _reset_peak_rss() -> str | None:
    """Reset the kernel's RSS high-water mark; None on success, else why it is impossible."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)  # give freed heap pages back so that earlier work does not hide new peaks
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _status_kib("VmHWM")
    except OSError as exc:
        return f"cannot reset the RSS high-water mark ({exc.__class__.__name__}: /proc/self/clear_refs)"
    return None


class PeakMemory:
    """Context manager: ``peak_mib`` = peak memory used inside the block above what was in use at its start
    (CPU: resident set via ``/proc``; CUDA: allocated tensors), or None with ``reason``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib: float | None = None
        self.reason: str | None = None
        self._base = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self.reason = _reset_peak_rss()
            if self.reason is None:
                self._base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self.reason is None:
            self.peak_mib = (_status_kib("VmHWM") * 1024 - self._base) / 2**20


class Phases:
    """Accumulates wall time per named phase (device-synchronised at the boundaries)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.s: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        t0 = time.perf_counter()
        yield
        synchronize(self.device)
        self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t0


def densify(module: nn.Module) -> nn.Module:
    """Re-initialise (default init) every layer whose weight is all zeros, so outputs are not trivially 0."""
    for m in module.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, Tensor) and hasattr(m, "reset_parameters") and not w.is_meta and not bool(w.any()):
            m.reset_parameters()
    return module


def _rel(diff: float, ref: Tensor) -> float:
    std = float(ref.float().std())
    return diff / std if std > 0 else float("inf")


def _max_abs(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _diffs(out: Tensor, ref: Tensor) -> dict[str, float]:
    """Max |out - ref|, that over the std of ``ref`` (``rel_diff``), and the RMS difference over the std."""
    d = out.float() - ref.float()
    std = float(ref.float().std())
    diff = float(d.abs().max())
    return {"max_abs_diff": diff, "rel_diff": _rel(diff, ref),
            "rel_rms_diff": float(d.pow(2).mean().sqrt()) / std if std > 0 else float("inf")}


# ----------------------------------------------------------------------------- networks


def build_unet(cfgs: PresetConfigs, device: torch.device, seed: int) -> nn.Module:
    """The preset's latent UNet (random, dense, frozen) on ``device``."""
    from ldae.nets.unet import LatentUNet
    from ldae.training.ema import freeze

    torch.manual_seed(seed)
    return freeze(densify(LatentUNet.from_config(cfgs["diffusion"]["model"])).to(device))


def build_ldae(cfgs: PresetConfigs, device: torch.device, seed: int, unet: nn.Module | None = None) -> Any:
    """An :class:`ldae.model.LDAE` of random networks of the preset (scale factor 1)."""
    from ldae.diffusion.schedule import NoiseSchedule
    from ldae.model import LDAE
    from ldae.nets.autoencoder import build_autoencoder
    from ldae.nets.semantic_encoder import build_semantic_encoder
    from ldae.training.ema import freeze

    unet = unet if unet is not None else build_unet(cfgs, device, seed)
    torch.manual_seed(seed + 1)
    shift = freeze(densify(unet.make_shift_decoder(cfgs.emb_dim)).to(device))
    encoder = freeze(build_semantic_encoder(cfgs["representation"]["model"]["semantic_encoder"],
                                            load_pretrained=False).to(device))
    ae_cfg = dict(cfgs["autoencoder"]["model"], init_weights=None)
    autoencoder = freeze(densify(build_autoencoder(ae_cfg)).to(device))
    return LDAE(autoencoder=autoencoder, unet=unet, encoder=encoder, shift=shift,
                schedule=NoiseSchedule.from_config(cfgs["diffusion"]["diffusion"]), scale_factor=1.0,
                spacing=cfgs["autoencoder"]["data"]["spacing"], shape=cfgs.image_shape,
                latent_shape=cfgs.latent_shape)


def build_voxel_dae(cfgs: PresetConfigs, device: torch.device, seed: int) -> Any:
    """The preset's voxel-space DAE baseline (random, dense, frozen)."""
    from ldae.baselines.voxel_dae import VoxelDAE

    torch.manual_seed(seed + 2)
    model = VoxelDAE.from_config(cfgs["voxel_dae"], device)
    densify(model.net)
    return model


def network_gflop(cfgs: PresetConfigs) -> dict[str, float]:
    """GFLOP of every benchmarked call at batch 1, counted on the meta device (no memory, no time)."""
    from ldae.baselines.voxel_dae import build_network
    from ldae.nets.autoencoder import build_autoencoder
    from ldae.nets.semantic_encoder import build_semantic_encoder
    from ldae.nets.unet import LatentUNet

    with torch.device("meta"):
        unet = LatentUNet.from_config(cfgs["diffusion"]["model"])
        shift = unet.make_shift_decoder(cfgs.emb_dim)
        ae = build_autoencoder(dict(cfgs["autoencoder"]["model"], init_weights=None))
        enc = build_semantic_encoder(cfgs["representation"]["model"]["semantic_encoder"], load_pretrained=False)
        vox = build_network(cfgs["voxel_dae"], load_pretrained=False)
        z = torch.empty(1, *cfgs.latent_shape)
        x = torch.empty(1, 1, *cfgs.image_shape)
        t = torch.zeros(1, dtype=torch.long)
        y = torch.empty(1, cfgs.emb_dim)
        yv = torch.empty(1, vox.encoder.emb_dim)
        h, skips, emb = unet.encode(z, t)
        calls: dict[str, Callable[[], Any]] = {
            "unet_forward": lambda: unet(z, t),
            "unet_encoder": lambda: unet.encode(z, t),
            "unet_decoder": lambda: unet.decode(h, skips, emb),
            "shift_decoder": lambda: shift(skips, t, y),
            "autoencoder_encode": lambda: ae.encode(x),
            "autoencoder_decode": lambda: ae.decode(z),
            "semantic_encoder": lambda: enc(x),
            "voxel_unet": lambda: vox.unet(x, t, yv),
            "voxel_semantic_encoder": lambda: vox.encoder(x),
        }
        with torch.no_grad():
            g = {name: count_flops(fn) / 1e9 for name, fn in calls.items()}
    g["conditional_step_shared"] = g["unet_encoder"] + g["unet_decoder"] + g["shift_decoder"]
    g["conditional_step_separate"] = g["conditional_step_shared"] + g["unet_encoder"]
    return g


# ----------------------------------------------------------------------------- sections


def bench_gemm(device: torch.device, size: int, repeats: int) -> dict:
    """Practical matmul peak (GFLOP/s, fastest of ``repeats``) in fp32 and bf16."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(device) for _ in range(2))
    flop = 2.0 * size**3
    out: dict[str, Any] = {"size": size}
    out["fp32_gflops"] = flop / time_call(lambda: a @ b, device, repeats, warmup=1)["min_s"] / 1e9
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        out["bf16_gflops"], out["bf16_note"] = None, "bf16 not supported by this GPU"
    else:
        a16, b16 = a.bfloat16(), b.bfloat16()
        out["bf16_gflops"] = flop / time_call(lambda: a16 @ b16, device, repeats, warmup=1)["min_s"] / 1e9
    if device.type == "cuda":
        out["fp32_note"] = f"TF32 matmul {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
    return out


def _unet_inputs(cfgs: PresetConfigs, device: torch.device, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(1, *cfgs.latent_shape, generator=gen).to(device)
    T = int(cfgs["diffusion"]["diffusion"]["timesteps"])
    return z, torch.full((1,), T // 2, dtype=torch.long, device=device)


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

    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        out["bf16_autocast"] = {"status": "skipped", "reason": "bf16 not supported by this GPU"}
    else:
        def bf16() -> Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return unet(z, t)
        base, timing, speedup = time_pair(fp32, bf16, device, opts.repeats, opts.warmup)
        out["bf16_autocast"] = {"status": "ok", **timing, "fp32_s": base["s"], "speedup": speedup,
                                **_diffs(bf16(), ref)}
    cl = torch.channels_last_3d
    z_cl = z.contiguous(memory_format=cl)
    unet_cl = copy.deepcopy(unet).to(memory_format=cl)  # a copy, so that the two can alternate

    def channels_last() -> Tensor:
        return unet_cl(z_cl, t)

    base, timing, speedup = time_pair(fp32, channels_last, device, opts.repeats, opts.warmup)
    out["channels_last_3d"] = {"status": "ok", **timing, "fp32_s": base["s"], "speedup": speedup,
                               **_diffs(channels_last(), ref)}
    return out


def bench_shared(model: Any, z: Tensor, t: Tensor, gflop: dict, opts: BenchOptions, device: torch.device) -> dict:
    """The LDAE conditional step (one encoder pass, two decoders) against two full passes."""
    from ldae.diffusion.pdae import guided_eps_fn

    unet, shift, schedule = model.unet, model.shift, model.schedule
    y = torch.randn(1, int(model.encoder.emb_dim), generator=torch.Generator().manual_seed(opts.seed)).to(device)
    shared = guided_eps_fn(unet, shift, schedule, y)
    scale = (1.0 - schedule.gather(schedule.alphas_cumprod, t, like=z)).sqrt()

    def separate() -> Tensor:
        eps = unet(z, t)
        _, skips, _ = unet.encode(z, t)  # G_ψ's own encoder pass
        return eps - scale * shift(skips, t, y)

    b, a, ratio = time_pair(separate, lambda: shared(z, t), device, opts.repeats, opts.warmup)
    return {"shared": {**a, "gflop": gflop["conditional_step_shared"]},
            "separate": {**b, "gflop": gflop["conditional_step_separate"]},
            "ratio": ratio,  # fastest separate / fastest shared, timed alternately
            "flop_ratio": gflop["conditional_step_separate"] / gflop["conditional_step_shared"],
            "max_abs_diff": _max_abs(shared(z, t), separate())}


def ldae_reconstruction(model: Any, x: Tensor, steps: int, phases: Phases) -> Tensor:
    """:meth:`ldae.model.LDAE.reconstruct`, spelled out with the same library calls, timed per phase."""
    from ldae.diffusion.ddim import ddim_invert, ddim_sample
    from ldae.diffusion.pdae import guided_eps_fn

    with phases("autoencoder_encode"):
        z0 = model.compress(x)
    with phases("semantic_encoder"):
        y = model.semantic(x)
    eps_fn = guided_eps_fn(model.unet, model.shift, model.schedule, y)
    with phases("ddim"):
        z_T = ddim_invert(eps_fn, z0, model.schedule, steps)
        z = ddim_sample(eps_fn, z_T, model.schedule, steps)
    with phases("autoencoder_decode"):
        return model.decompress(z)


def voxel_reconstruction(model: Any, x: Tensor, steps: int, phases: Phases) -> Tensor:
    """:meth:`ldae.baselines.voxel_dae.VoxelDAE.reconstruct`, spelled out with the same calls, timed per phase."""
    from ldae.baselines.voxel_dae import from_diffusion, to_diffusion
    from ldae.diffusion.ddim import ddim_invert, ddim_sample

    with phases("semantic_encoder"):
        y = model.net.semantic(x)
    eps_fn = model.eps_fn(y)
    with phases("ddim"):
        x_T = ddim_invert(eps_fn, to_diffusion(x), model.schedule, steps)
        v = ddim_sample(eps_fn, x_T, model.schedule, steps, clip=model.clip)
    return from_diffusion(v)


def bench_reconstruction(run: Callable[[Any, Tensor, int, Phases], Tensor], model: Any, x: Tensor,
                         opts: BenchOptions, device: torch.device, fixed_gflop: float, step_gflop: float) -> dict:
    """Time ``repeats`` reconstructions (peak memory over the first); per-step cost and extrapolation."""
    runs: list[dict[str, float]] = []
    peak = PeakMemory(device)
    for i in range(opts.repeats):
        phases = Phases(device)
        if i == 0:
            with peak:
                run(model, x, opts.steps, phases)
        else:
            run(model, x, opts.steps, phases)
        runs.append(phases.s)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    total = statistics.median(sum(r.values()) for r in runs)
    evals = 2 * opts.steps  # N inversion + N sampling network evaluations
    per_step = med["ddim"] / evals
    fixed = total - med["ddim"]
    target = int(opts.paper_claim["steps"])
    return {"steps": opts.steps, "s": total, "phases_s": med, "per_step_s": per_step, "fixed_s": fixed,
            "peak_mib": peak.peak_mib, "peak_note": peak.reason,
            "gflop": fixed_gflop + evals * step_gflop,
            "extrapolated_steps": target, "extrapolated_s": fixed + 2 * target * per_step,
            "extrapolated_gflop": fixed_gflop + 2 * target * step_gflop}


def bench_decode(model: Any, opts: BenchOptions, device: torch.device, gflop: float) -> dict:
    """Autoencoder decode of one latent to full resolution: fp32 and bf16 autocast, time and peak memory."""
    gen = torch.Generator().manual_seed(opts.seed)
    z = torch.randn(1, *model.latent_shape, generator=gen).to(device)
    ae = model.autoencoder
    out: dict[str, Any] = {"image_shape": list(model.shape), "gflop": gflop}

    def measure(autocast: bool) -> tuple[dict, Tensor]:
        result: dict[str, Tensor] = {}

        def call() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                result["x"] = ae.decode(z)

        with PeakMemory(device) as peak:
            timing = time_call(call, device, opts.repeats)
        return {**timing, "gflops": gflop / timing["s"], "peak_mib": peak.peak_mib, "peak_note": peak.reason}, \
            result["x"]

    out["fp32"], ref = measure(False)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        out["bf16_autocast"] = {"status": "skipped", "reason": "bf16 not supported by this GPU"}
    else:
        res, x16 = measure(True)
        out["bf16_autocast"] = {"status": "ok", **res, "speedup": out["fp32"]["min_s"] / res["min_s"],
                                **_diffs(x16, ref)}
    return out


def bench_compile(opts: BenchOptions, device: torch.device) -> dict:
    """``torch.compile`` of the latent UNet, measured in a subprocess killed after ``compile_timeout_s``."""
    from ldae.io import write_json

    with tempfile.TemporaryDirectory(prefix="ldae-bench-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        write_json(request, {"preset": opts.preset, "device": str(device), "threads": opts.threads,
                             "repeats": opts.repeats, "warmup": opts.warmup, "seed": opts.seed})
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / "inductor"),
                   TORCHINDUCTOR_COMPILE_THREADS="1")
        proc = subprocess.Popen([sys.executable, "-m", "ldae.jobs.bench", "--compile-worker", str(request), str(result)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=opts.compile_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker and any compiler processes it started
            proc.communicate()
            return {"status": "timeout",
                    "reason": f"compile + timing took over {opts.compile_timeout_s:g} s (compile.timeout_s)"}
        if proc.returncode != 0 or not result.is_file():
            lines = [ln for ln in (output or "").splitlines() if ln.strip()]
            return {"status": "failed", "reason": lines[-1] if lines else f"exit code {proc.returncode}"}
        return json.loads(result.read_text())


def _compile_worker(request_path: str, result_path: str) -> None:
    """Subprocess body of :func:`bench_compile`: eager vs compiled UNet step, same inputs."""
    from ldae.io import write_json

    req = json.loads(Path(request_path).read_text())
    torch.set_num_threads(int(req["threads"]))
    device = torch.device(req["device"])
    cfgs = PresetConfigs.load(req["preset"])
    unet = build_unet(cfgs, device, int(req["seed"]))
    z, t = _unet_inputs(cfgs, device, int(req["seed"]))
    repeats, warmup = int(req["repeats"]), int(req["warmup"])
    with torch.no_grad():
        ref = unet(z, t)
        compiled = torch.compile(unet)
        t0 = time.perf_counter()
        out = compiled(z, t)
        synchronize(device)
        compile_s = time.perf_counter() - t0
        eager, timing, speedup = time_pair(lambda: unet(z, t), lambda: compiled(z, t), device, repeats, warmup)
    write_json(result_path, {"status": "ok", "compile_s": compile_s, **timing, "eager_s": eager["s"],
                             "speedup": speedup, **_diffs(out, ref)})


# ----------------------------------------------------------------------------- recommendation


def recommend(results: dict, rules: dict) -> dict:
    """Inference settings worth making the default on this device, each with the measured reason."""
    min_speedup, max_rel = float(rules["min_speedup"]), float(rules["max_rel_diff"])
    out: dict[str, Any] = {"device": results.get("device"), "min_speedup": min_speedup, "max_rel_diff": max_rel}
    reasons: dict[str, str] = {}

    def judge(key: str, entry: dict | None, precision: bool) -> None:
        if not entry or entry.get("status") != "ok":
            out[key] = False
            reasons[key] = "not measured" + (f" ({entry.get('reason')})" if entry and entry.get("reason") else "")
            return
        fast = entry["speedup"] >= min_speedup
        accurate = (not precision) or entry["rel_diff"] <= max_rel
        out[key] = bool(fast and accurate)
        reasons[key] = (f"{entry['speedup']:.2f}x vs fp32 eager (need >= {min_speedup:g}x)"
                        + (f", max |diff| = {entry['rel_diff']:.2%} of the output std (limit {max_rel:.0%})"
                           if precision else ""))

    variants = results.get("unet", {}).get("variants") or {}
    judge("unet_autocast_bf16", variants.get("bf16_autocast"), True)
    judge("channels_last_3d", variants.get("channels_last_3d"), False)
    judge("compile", results.get("unet", {}).get("compile"), False)
    judge("autoencoder_autocast_bf16", (results.get("autoencoder_decode") or {}).get("bf16_autocast"), True)
    out["reasons"] = reasons
    return out


# ----------------------------------------------------------------------------- driver


def environment(device: torch.device, threads: int) -> dict:
    """Device, software and load facts that the numbers depend on."""
    import platform

    import monai

    env: dict[str, Any] = {"device": str(device), "threads": threads, "torch": torch.__version__,
                           "monai": monai.__version__, "python": platform.python_version(),
                           "load_average": list(os.getloadavg())}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        flags: set[str] = set()
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.startswith("model name") and "device_name" not in env:
                        env["device_name"] = line.split(":", 1)[1].strip()
                    elif line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
        except OSError:
            pass
        env.setdefault("device_name", platform.processor() or "cpu")
        env["cpu_bf16"] = sorted(flags & {"avx512_bf16", "amx_bf16"}) or "none (bf16 is emulated)"
        env["cpu_count"] = os.cpu_count()
    return env


def _notes(opts: BenchOptions, env: dict, device: torch.device) -> list[str]:
    notes = [
        "random networks of the preset; zero-initialised layers re-initialised so outputs are not trivially 0",
        "FLOPs: FlopCounterMode on the meta device (matmul/conv/attention only); times: median of repeats",
        "peak memory: increase over the call (CPU resident set / CUDA allocated), weights excluded",
        f"reconstructions run {opts.steps} DDIM steps each way; extrapolated per step to "
        f"{opts.paper_claim['steps']} steps (fixed costs + 2 x steps x measured per-step cost)",
    ]
    if device.type == "cpu" and env["load_average"][0] > opts.threads:
        notes.append(f"machine busy: 1-min load average {env['load_average'][0]:.1f} on {opts.threads} thread(s): "
                     "timings are inflated and noisy" + (" (--threads 1 is steadier on a shared CPU)"
                                                         if opts.threads > 1 else ""))
    return notes


def _ldae_sections(res: dict, on: list[str], cfgs: PresetConfigs, opts: BenchOptions, device: torch.device,
                   x: Tensor) -> None:
    """The sections that use LDAE's networks (built once, freed on return)."""
    gflop = res["gflop"]
    model = build_ldae(cfgs, device, opts.seed)
    z, t = _unet_inputs(cfgs, device, opts.seed)
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
        log.info("bench: LDAE reconstruction, %d steps each way", opts.steps)
        fixed = gflop["autoencoder_encode"] + gflop["semantic_encoder"] + gflop["autoencoder_decode"]
        res.setdefault("reconstruction", {})["ldae"] = bench_reconstruction(
            ldae_reconstruction, model, x, opts, device, fixed, gflop["conditional_step_shared"])
    if "decode" in on:
        log.info("bench: autoencoder decode to %s", list(cfgs.image_shape))
        res["autoencoder_decode"] = bench_decode(model, opts, device, gflop["autoencoder_decode"])


def _ratios(recon: dict, claim: dict) -> None:
    a, b = recon["ldae"], recon["voxel_dae"]
    recon["ratio"] = b["s"] / a["s"]
    recon["flop_ratio"] = b["gflop"] / a["gflop"]
    recon["extrapolated_ratio"] = b["extrapolated_s"] / a["extrapolated_s"]
    recon["extrapolated_flop_ratio"] = b["extrapolated_gflop"] / a["extrapolated_gflop"]
    recon["paper_claim"] = {**claim, "ratio": float(claim["voxel_dae_s"]) / float(claim["ldae_s"])}


def run_bench(opts: BenchOptions) -> dict:
    """Run every section not in ``opts.skip`` and return the results (the JSON document)."""
    device = resolve_device(opts.device)
    torch.set_num_threads(opts.threads)
    cfgs = PresetConfigs.load(opts.preset)
    started = time.perf_counter()
    env = environment(device, opts.threads)
    res: dict[str, Any] = {"preset": opts.preset, "device": str(device), "options": asdict(opts), "environment": env,
                           "notes": _notes(opts, env, device), "gflop": network_gflop(cfgs)}
    on = [s for s in SECTIONS if s not in opts.skip]
    x = torch.rand(1, 1, *cfgs.image_shape, generator=torch.Generator().manual_seed(opts.seed)).to(device)
    with torch.no_grad():
        if "gemm" in on:
            log.info("bench: GEMM peak (%d x %d)", opts.gemm_size, opts.gemm_size)
            res["gemm"] = bench_gemm(device, opts.gemm_size, opts.gemm_repeats)
        if {"unet", "variants", "shared", "recon", "decode"} & set(on):
            _ldae_sections(res, on, cfgs, opts, device, x)
            gc.collect()  # LDAE's networks are gone before the (much larger) voxel activations
        if "voxel" in on:
            log.info("bench: voxel DAE reconstruction %s, %d steps each way", list(cfgs.image_shape), opts.steps)
            voxel = build_voxel_dae(cfgs, device, opts.seed)
            res.setdefault("reconstruction", {})["voxel_dae"] = bench_reconstruction(
                voxel_reconstruction, voxel, x, opts, device, res["gflop"]["voxel_semantic_encoder"],
                res["gflop"]["voxel_unet"])
            del voxel
            gc.collect()
    recon = res.get("reconstruction", {})
    if "ldae" in recon and "voxel_dae" in recon:
        _ratios(recon, opts.paper_claim)
    if "compile" in on:
        log.info("bench: torch.compile of the UNet (subprocess, at most %g s)", opts.compile_timeout_s)
        res.setdefault("unet", {})["compile"] = bench_compile(opts, device)
    elif "unet" in res:
        res["unet"]["compile"] = {"status": "skipped", "reason": "compile section skipped"}
    res["recommendation"] = recommend(res, opts.recommend)
    env["load_average_end"] = list(os.getloadavg())
    res["wall_s"] = time.perf_counter() - started
    return res


# ----------------------------------------------------------------------------- table


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def _mib(x: float | None) -> str:
    return "-" if x is None else (f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MiB")


def table_rows(res: dict) -> list[tuple[str, str, str]]:
    """(measure, value, detail) rows of the results, in reading order."""
    rows: list[tuple[str, str, str]] = []
    g = res.get("gemm")
    if g:
        bf = g.get("bf16_gflops")
        rows.append(("GEMM peak fp32 / bf16", f"{g['fp32_gflops']:.0f} / {'-' if bf is None else f'{bf:.0f}'} GFLOP/s",
                     f"{g['size']}x{g['size']} matmul, fastest of runs"))
    u = res.get("unet")
    if u and "s" in u:
        frac = u.get("fraction_of_fp32_peak")
        rows.append(("UNet step fp32 (batch 1)", _s(u["s"]),
                     f"latent {'x'.join(map(str, u['latent_shape']))}, {u['params'] / 1e6:.1f} M params, "
                     f"{u['gflop']:.1f} GFLOP -> {u['gflops']:.1f} GFLOP/s"
                     + (f" ({frac:.0%} of fp32 peak)" if frac else "")))
        labels = {"bf16_autocast": "UNet step bf16 autocast", "channels_last_3d": "UNet step channels-last-3d"}
        for key, entry in (u.get("variants") or {}).items():
            row = _variant_row(labels[key], entry)
            if entry.get("fraction_of_bf16_peak"):
                row = (row[0], row[1], row[2] + f"; {entry['gflops']:.1f} GFLOP/s "
                       f"({entry['fraction_of_bf16_peak']:.0%} of bf16 peak)")
            rows.append(row)
        if "compile" in u:
            c = u["compile"]
            row = _variant_row("UNet step torch.compile", c)
            if c.get("status") == "ok":
                row = (row[0], row[1], row[2].replace("vs fp32", f"vs fp32 eager {_s(c['eager_s'])} in its subprocess")
                       + f", compile {c['compile_s']:.0f} s")
            rows.append(row)
    sh = res.get("shared_step")
    if sh:
        rows.append(("Conditional step, shared encoder", _s(sh["shared"]["s"]),
                     f"eps + G_psi from one encoder pass, {sh['shared']['gflop']:.1f} GFLOP"))
        rows.append(("Conditional step, two full passes", _s(sh["separate"]["s"]),
                     f"{sh['ratio']:.2f}x the shared step (FLOP ratio {sh['flop_ratio']:.2f}); "
                     f"max |diff| {sh['max_abs_diff']:.1e}"))
    rec = res.get("reconstruction") or {}
    for key, label in (("ldae", "LDAE"), ("voxel_dae", "Voxel DAE")):
        r = rec.get(key)
        if r:
            parts = ", ".join(f"{k.replace('_', ' ')} {_s(v)}" for k, v in r["phases_s"].items())
            rows.append((f"{label} reconstruction, {r['steps']}+{r['steps']} steps", _s(r["s"]),
                         f"{parts}; {_s(r['per_step_s'])}/step; peak +{_mib(r['peak_mib'])}; {r['gflop']:.0f} GFLOP"))
    if "ratio" in rec:
        n = rec["ldae"]["extrapolated_steps"]
        rows.append(("Voxel DAE / LDAE, measured", f"{rec['ratio']:.1f}x", f"FLOP ratio {rec['flop_ratio']:.1f}x"))
        rows.append((f"Voxel DAE / LDAE, extrapolated to {n} steps", f"{rec['extrapolated_ratio']:.1f}x",
                     f"{_s(rec['voxel_dae']['extrapolated_s'])} vs {_s(rec['ldae']['extrapolated_s'])} per scan; "
                     f"FLOP ratio {rec['extrapolated_flop_ratio']:.1f}x; paper (A100): "
                     f"{rec['paper_claim']['voxel_dae_s']:g} s vs {rec['paper_claim']['ldae_s']:g} s "
                     f"= {rec['paper_claim']['ratio']:.0f}x"))
    d = res.get("autoencoder_decode")
    if d:
        shape = "x".join(map(str, d["image_shape"]))
        rows.append(("Autoencoder decode fp32", _s(d["fp32"]["s"]),
                     f"to {shape}, {d['gflop']:.0f} GFLOP, peak +{_mib(d['fp32']['peak_mib'])}"))
        b = d["bf16_autocast"]
        if b.get("status") == "ok":
            rows.append(("Autoencoder decode bf16 autocast", _s(b["s"]),
                         f"{b['speedup']:.2f}x, peak +{_mib(b['peak_mib'])}, max |diff| {b['max_abs_diff']:.2e} "
                         f"({b['rel_diff']:.2%} of std)"))
        else:
            rows.append(("Autoencoder decode bf16 autocast", b.get("status", "-"), b.get("reason", "")))
    r = res.get("recommendation")
    if r:
        keys = [k for k in ("unet_autocast_bf16", "autoencoder_autocast_bf16", "channels_last_3d", "compile") if r.get(k)]
        rows.append(("Recommended for inference", ", ".join(keys) or "fp32 eager (nothing measured helps enough)",
                     "; ".join(f"{k}: {v}" for k, v in r["reasons"].items())))
    return rows


def _variant_row(label: str, entry: dict) -> tuple[str, str, str]:
    if entry.get("status") != "ok":
        return label, entry.get("status", "-"), entry.get("reason", "")
    return label, _s(entry["s"]), (f"{entry['speedup']:.2f}x vs fp32 (timed alternately), max |diff| {entry['max_abs_diff']:.2e} "
                                   f"({entry['rel_diff']:.2%} of std)")


def print_table(res: dict, console: Any = None) -> None:
    """Print the results as a rich table."""
    from rich.console import Console
    from rich.table import Table

    env = res["environment"]
    title = (f"ldae bench: preset {res['preset']} on {env.get('device_name', res['device'])} ({res['device']}, "
             f"{env['threads']} threads, load {env['load_average'][0]:.1f})")
    table = Table(title=title, show_lines=False)
    table.add_column("measure", style="bold")
    table.add_column("value", justify="right")
    table.add_column("detail", overflow="fold")
    for row in table_rows(res):
        table.add_row(*row)
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: wide enough for the detail column
            console = Console(width=160)
    console.print(table)
    for note in res.get("notes", []):
        console.print(f"[dim]note: {note}[/dim]")


if __name__ == "__main__":  # the torch.compile worker: python -m ldae.jobs.bench --compile-worker REQUEST RESULT
    if len(sys.argv) == 4 and sys.argv[1] == "--compile-worker":
        _compile_worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m ldae.jobs.bench --compile-worker REQUEST.json RESULT.json")
