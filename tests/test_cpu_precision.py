"""resolve_precision on CPUs: bf16 autocast only where oneDNN has native bf16 (issue 19: emulated bf16 made a
tiny training step 11x slower on an AVX2 CPU)."""

from __future__ import annotations

import pytest
import torch

from ldae.training import common
from ldae.training.common import cpu_bf16_native, resolve_precision


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_bf16_on_cpu_only_with_native_support(monkeypatch, no_cuda, native, accelerator):
    monkeypatch.setattr(common, "cpu_bf16_native", lambda: native)
    got = resolve_precision({"precision": "bf16-mixed", "accelerator": accelerator})
    assert got == ("bf16-mixed" if native else "32-true")
    assert resolve_precision({"precision": "32-true", "accelerator": accelerator}) == "32-true"
    assert resolve_precision({"accelerator": accelerator}) == "32-true"


def test_cuda_runs_are_not_judged_by_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(common, "cpu_bf16_native", lambda: False)
    assert resolve_precision({"precision": "bf16-mixed", "accelerator": "gpu"}) == "bf16-mixed"
    assert resolve_precision({"precision": "bf16-mixed", "accelerator": "auto"}) == "bf16-mixed"
    # an explicit CPU run on a machine that also has a GPU is judged by the CPU
    assert resolve_precision({"precision": "bf16-mixed", "accelerator": "cpu"}) == "32-true"


def test_native_bf16_follows_onednn_and_its_isa_cap(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert cpu_bf16_native() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu_bf16_native() is False
