"""Measuring tools of ``ldae bench``: wall time (device-synchronised, medians), FLOPs, peak memory, per-phase
time of a model's own methods, and the facts of the machine the numbers depend on.

Peak memory is the increase during a block over what was in use at its start: on CPU the process's resident
set (``/proc/self/clear_refs`` resets the kernel's high-water mark ``VmHWM``), on CUDA
``torch.cuda.max_memory_allocated`` (tensors; the caching allocator's reserve is reported beside it).
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import wraps
from typing import Any

import torch
from torch import nn

Tensor = torch.Tensor


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(runs: Sequence[float]) -> dict:
    """``{'s': median, 'min_s': fastest, 'runs_s': all}`` of run times in seconds."""
    runs = list(runs)
    return {"s": statistics.median(runs), "min_s": min(runs), "runs_s": runs}


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
    return summary(runs)


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
    _malloc_trim()  # so that earlier work does not hide new peaks
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _status_kib("VmHWM")
    except OSError as exc:
        return f"cannot reset the RSS high-water mark ({exc.__class__.__name__}: /proc/self/clear_refs)"
    return None


def resident_mib() -> float | None:
    """The process's resident set now (MiB), or None where ``/proc`` is unavailable."""
    try:
        return _status_kib("VmRSS") / 1024
    except OSError:
        return None


class PeakMemory:
    """Context manager: ``peak_mib`` = peak memory used inside the block above what was in use at its start
    (CPU: resident set via ``/proc``; CUDA: allocated tensors, and ``reserved_mib`` the allocator's peak
    reserve), or None with ``reason``. ``base_mib`` overrides the starting level (e.g. the level before a
    model was built, so that its weights count)."""

    def __init__(self, device: torch.device, base_mib: float | None = None) -> None:
        self.device = device
        self.peak_mib: float | None = None
        self.reserved_mib: float | None = None
        self.reason: str | None = None
        self._base = 0 if base_mib is None else int(base_mib * 2**20)
        self._given_base = base_mib is not None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            if not self._given_base:
                self._base = torch.cuda.memory_allocated(self.device)
        else:
            self.reason = _reset_peak_rss()
            if self.reason is None and not self._given_base:
                self._base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            self.reserved_mib = torch.cuda.max_memory_reserved(self.device) / 2**20
        elif self.reason is None:
            self.peak_mib = (_status_kib("VmHWM") * 1024 - self._base) / 2**20


def cuda_allocated_mib(device: torch.device) -> float:
    """Memory held by tensors on a CUDA device now (MiB); 0 for the CPU."""
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def _malloc_trim() -> None:
    """Give freed heap pages back to the system (glibc), so that the resident set shows what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def free_memory(device: torch.device) -> None:
    """Collect garbage; on CUDA return cached blocks to the driver (after an out-of-memory error), on the
    CPU freed heap pages to the system."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


class Phases:
    """Accumulates wall time per named phase (device-synchronised at the boundaries)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.s: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t0

    @contextmanager
    def instrument(self, targets: Sequence[tuple[Any, str, str]]) -> Iterator[Phases]:
        """Time the methods named by ``targets`` — ``(object, method name, phase name)`` — while the block
        runs, by shadowing each bound method with a timed wrapper on that one object (the class is not
        touched; the wrappers are removed on exit). A model's own code path then runs unchanged and its
        building blocks report their time: e.g. ``LDAE.reconstruct`` with ``compress`` and ``decompress``
        instrumented."""
        installed: list[tuple[Any, str]] = []
        try:
            for obj, method, phase in targets:
                if method in vars(obj):
                    raise ValueError(f"{type(obj).__name__}.{method} is already instrumented")
                original = getattr(obj, method)

                def timed(*args: Any, _original: Callable = original, _phase: str = phase, **kwargs: Any) -> Any:
                    with self(_phase):
                        return _original(*args, **kwargs)

                object.__setattr__(obj, method, wraps(original)(timed))
                installed.append((obj, method))
            yield self
        finally:
            for obj, method in reversed(installed):
                object.__delattr__(obj, method)


def densify(module: nn.Module) -> nn.Module:
    """Re-initialise (default init) every layer whose weight is all zeros, so outputs are not trivially 0."""
    for m in module.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, Tensor) and hasattr(m, "reset_parameters") and not w.is_meta and not bool(w.any()):
            m.reset_parameters()
    return module


def rel(diff: float, ref: Tensor) -> float:
    std = float(ref.float().std())
    return diff / std if std > 0 else float("inf")


def max_abs(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def diffs(out: Tensor, ref: Tensor) -> dict[str, float]:
    """Max |out - ref|, that over the std of ``ref`` (``rel_diff``), and the RMS difference over the std."""
    d = out.float() - ref.float()
    std = float(ref.float().std())
    diff = float(d.abs().max())
    return {"max_abs_diff": diff, "rel_diff": rel(diff, ref),
            "rel_rms_diff": float(d.pow(2).mean().sqrt()) / std if std > 0 else float("inf")}


def environment(device: torch.device, threads: int) -> dict:
    """Device, software and load facts that the numbers depend on."""
    import platform

    import monai

    env: dict[str, Any] = {"device": str(device), "threads": threads, "torch": torch.__version__,
                           "monai": monai.__version__, "python": platform.python_version(),
                           "load_average": list(os.getloadavg())}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = torch.cuda.get_device_name(device)
        env["device_memory_mib"] = props.total_memory / 2**20
        env["cuda"] = torch.version.cuda
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
        try:
            env["memory_mib"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
        except (OSError, ValueError):
            pass
    return env
