"""``torch.compile`` of the latent UNet, measured in a subprocess that is killed past a time cap (inductor can
take many minutes on a CPU, and a hung compiler must not hang the benchmark)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ldae.jobs.bench.measure import diffs, synchronize, time_pair
from ldae.jobs.bench.models import build_unet, unet_inputs
from ldae.jobs.bench.options import BenchOptions, PresetConfigs


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


def compile_worker(request_path: str, result_path: str) -> None:
    """Subprocess body of :func:`bench_compile`: eager vs compiled UNet step, same inputs."""
    from ldae.io import write_json

    req = json.loads(Path(request_path).read_text())
    torch.set_num_threads(int(req["threads"]))
    device = torch.device(req["device"])
    cfgs = PresetConfigs.load(req["preset"])
    unet = build_unet(cfgs, device, int(req["seed"]))
    z, t = unet_inputs(cfgs, device, int(req["seed"]))
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
                             "speedup": speedup, **diffs(out, ref)})
