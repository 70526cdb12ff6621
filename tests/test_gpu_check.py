"""``scripts/gpu_check.sh`` (the GPU acceptance check) at tiny sizes on the CPU (``LDAE_GPU_CHECK_TINY=1``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _env(**extra: str) -> dict:
    bin_dir = Path(sys.executable).parent
    return {**os.environ, "PYTHON": sys.executable, "LDAE": str(bin_dir / "ldae"), **extra}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(tmp_path: Path):
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env=_env(LDAE_GPU_CHECK_STEPS="bench"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "out" / "bench.json").exists()


def test_unknown_step_is_refused(tmp_path: Path):
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")],
                          env=_env(LDAE_GPU_CHECK_TINY="1", LDAE_GPU_CHECK_STEPS="lint"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown step 'lint'" in proc.stderr


@pytest.mark.slow
def test_tiny_cpu_run_writes_everything_into_one_folder(tmp_path: Path):
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], env=_env(LDAE_GPU_CHECK_TINY="1", OMP_NUM_THREADS="2"),
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] and summary["device"] == "cpu"
    assert [s["step"] for s in summary["steps"]] == ["tests", "bench_tiny", "synth", "pipeline"]
    assert all(s["exit"] == 0 for s in summary["steps"])
    for name in ("tests", "bench_tiny", "synth", "pipeline"):
        assert (out / f"{name}.log").stat().st_size > 0
    # the training benchmark: every stage measured, a largest batch, a projected schedule
    train = json.loads((out / "bench.json").read_text())["train"]
    assert set(train["stages"]) == {"autoencoder", "diffusion", "representation"}
    assert all(s["largest_batch"] == 2 for s in train["stages"].values())
    assert summary["train_schedule_s"]["1"] > 0
    # the pipeline with its evaluation, and TensorBoard events beside every stage's metrics.csv
    assert (out / "run" / "evaluation" / "metrics.json").is_file()
    assert summary["tensorboard_event_files"]["autoencoder"] >= 1
    assert all(summary["tensorboard_event_files"][s] >= 1 for s in ("autoencoder", "diffusion", "representation"))
