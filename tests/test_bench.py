"""``ldae bench``: measuring tools against closed forms, the timed reconstructions against the library's own
``reconstruct``, the recommendation rules, and the tiny preset end to end."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ldae.cli import main
from ldae.errors import ConfigError
from ldae.jobs.bench import (
    SECTIONS,
    BenchOptions,
    PeakMemory,
    Phases,
    PresetConfigs,
    TrainOptions,
    bench_compile,
    bench_config,
    build_ldae,
    build_voxel_dae,
    count_flops,
    densify,
    options_from_config,
    recommend,
    time_call,
    time_pair,
)
from ldae.jobs.bench.reconstruction import ldae_targets, reconstruct_timed, voxel_targets

CPU = torch.device("cpu")


@pytest.fixture
def one_thread():
    """One torch thread (steadier and faster on a shared 2-core machine); restores the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


@pytest.mark.parametrize("stride,padding,groups", [(1, 1, 1), (2, 1, 2), (2, 0, 1)])
def test_conv3d_flops_closed_form(stride: int, padding: int, groups: int):
    b, cin, cout, k, size = 2, 4, 6, 3, (9, 10, 11)
    conv = torch.nn.Conv3d(cin, cout, k, stride=stride, padding=padding, groups=groups)
    x = torch.randn(b, cin, *size)
    out_vox = 1
    for n in size:
        out_vox *= _conv_out(n, k, stride, padding)
    # one multiply-add (2 FLOPs) per output voxel, output channel and input tap of its group
    expected = 2 * b * cout * (cin // groups) * k**3 * out_vox
    assert count_flops(lambda: conv(x)) == expected
    with torch.device("meta"):  # the bench counts networks on the meta device: same numbers
        meta_conv = torch.nn.Conv3d(cin, cout, k, stride=stride, padding=padding, groups=groups)
        assert count_flops(lambda: meta_conv(torch.empty(b, cin, *size))) == expected


def test_attention_flops_counted_on_meta():
    b, heads, n, d = 1, 4, 80, 16
    q = torch.empty(b, heads, n, d, device="meta")
    # Q K^T and (softmax) V: two (n x d) @ (d x n)-sized matmuls per head
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == 2 * (2 * b * heads * n * n * d)


def test_time_call_counts_runs():
    calls = []
    out = time_call(lambda: (calls.append(1), time.sleep(0.01)), CPU, repeats=3, warmup=2)
    assert len(calls) == 5 and len(out["runs_s"]) == 3
    assert 0.01 <= out["min_s"] <= out["s"]


def test_time_pair_alternates_and_compares_fastest_runs():
    order = []
    a, b, speedup = time_pair(lambda: (order.append("a"), time.sleep(0.02)), lambda: (order.append("b"), time.sleep(0.01)),
                              CPU, repeats=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert len(a["runs_s"]) == len(b["runs_s"]) == 3
    assert speedup == pytest.approx(a["min_s"] / b["min_s"]) and 1.2 < speedup < 2.5


def test_peak_memory_sees_a_known_allocation():
    with PeakMemory(CPU) as probe:
        pass
    if probe.peak_mib is None:
        pytest.skip(probe.reason)
    size_mib = 256
    with PeakMemory(CPU) as peak:
        buf = torch.ones(size_mib * 2**20 // 4)  # touched pages: resident
        del buf
    assert size_mib * 0.95 <= peak.peak_mib <= size_mib * 1.5


def test_phases_accumulate():
    ph = Phases(CPU)
    for _ in range(2):
        with ph("a"):
            time.sleep(0.005)
    assert set(ph.s) == {"a"} and ph.s["a"] >= 0.01


def test_densify_only_touches_zero_layers():
    from ldae.nets.unet import LatentUNet

    unet = LatentUNet(in_channels=2, channels=[8, 16], num_res_blocks=1, attention_factors=[2], num_heads=2,
                      norm_num_groups=4).eval()
    z, t = torch.randn(1, 2, 4, 6, 4), torch.tensor([10])
    assert not unet(z, t).any()  # zero-initialised output layer
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    densify(unet)
    after = unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(not before[k].any() for k in changed)  # only all-zero tensors were re-drawn
    assert unet(z, t).abs().max() > 0


def _small_tiny_configs() -> PresetConfigs:
    """The tiny preset on a 16x20x16 grid (same networks, fewer voxels) for exactness tests."""
    cfgs = copy.deepcopy(PresetConfigs.load("tiny"))
    for stage in ("autoencoder", "voxel_dae"):
        cfgs[stage]["data"]["shape"] = [16, 20, 16]
    cfgs["representation"]["model"]["semantic_encoder"]["num_slices"] = 16
    cfgs["voxel_dae"]["model"]["semantic_encoder"]["num_slices"] = 16
    cfgs.check()
    return cfgs


def test_phases_instrument_times_methods_and_restores_them():
    class Model:
        def inner(self, v: int) -> int:
            time.sleep(0.01)
            return v + 1

        def outer(self, v: int) -> int:
            return self.inner(v) * 2

    m = Model()
    ph = Phases(CPU)
    with ph.instrument([(m, "inner", "a"), (m, "outer", "b")]):
        assert m.outer(1) == 4  # the object's own code path, through the wrappers
        with pytest.raises(ValueError, match="already instrumented"):
            with ph.instrument([(m, "inner", "c")]):
                pass
    assert "inner" not in vars(m) and "outer" not in vars(m)  # wrappers gone, class untouched
    assert ph.s["b"] >= ph.s["a"] >= 0.01


def test_timed_reconstructions_are_the_models_own(one_thread, monkeypatch):
    from ldae.baselines.voxel_dae import VoxelDAE
    from ldae.model import LDAE

    cfgs = _small_tiny_configs()
    x = torch.rand(1, 1, *cfgs.image_shape, generator=torch.Generator().manual_seed(1))
    calls = []
    for cls in (LDAE, VoxelDAE):  # the benchmark must go through the classes' reconstruct, not a copy of it
        original = cls.reconstruct
        monkeypatch.setattr(cls, "reconstruct", lambda self, *a, _o=original, _c=cls, **k: (calls.append(_c), _o(self, *a, **k))[1])
    with torch.no_grad():
        ldae = build_ldae(cfgs, CPU, seed=0)
        ours, phases, methods = reconstruct_timed(ldae, x, 2, ldae_targets(ldae), CPU)
        assert set(phases) == {"autoencoder_encode", "semantic_encoder", "ddim", "autoencoder_decode"}
        assert set(methods) == {"encode", "decode"} and all(v > 0 for v in methods.values())
        assert methods["encode"] >= phases["autoencoder_encode"] + phases["semantic_encoder"]
        assert methods["decode"] >= phases["autoencoder_decode"]
        torch.testing.assert_close(ours, ldae.reconstruct(x, steps=2), rtol=0, atol=0)
        voxel = build_voxel_dae(cfgs, CPU, seed=0)
        ours, phases, methods = reconstruct_timed(voxel, x, 2, voxel_targets(voxel), CPU)
        assert set(phases) == {"semantic_encoder", "ddim"} and set(methods) == {"encode", "decode"}
        torch.testing.assert_close(ours, voxel.reconstruct(x, steps=2), rtol=0, atol=0)
    assert calls == [LDAE, LDAE, VoxelDAE, VoxelDAE]
    assert not {"compress", "semantic", "decompress", "encode", "decode"} & set(vars(ldae))


def test_preset_mismatch_is_a_config_error():
    cfgs = _small_tiny_configs()
    cfgs["voxel_dae"]["data"]["shape"] = [32, 40, 32]
    with pytest.raises(ConfigError, match="voxel_dae data.shape"):
        cfgs.check()


def test_options_from_config_defaults_and_errors():
    cfg = bench_config()
    opts = options_from_config(cfg, preset="paper")
    assert opts.steps == cfg["steps"]["paper"] and opts.threads >= 1 and opts.skip == ()
    assert options_from_config(cfg, steps=4, threads=1, skip=("compile",)).steps == 4
    with pytest.raises(ConfigError, match="steps"):
        options_from_config(cfg, steps=0)
    with pytest.raises(ConfigError, match="unknown bench section"):
        options_from_config(cfg, skip=("gpu",))
    off = copy.deepcopy(cfg)
    off["compile"]["enabled"] = False
    assert "compile" in options_from_config(off).skip
    assert set(SECTIONS) >= {"gemm", "unet", "shared", "recon", "voxel", "decode", "compile"}


def test_recommend_rules():
    rules = {"min_speedup": 1.2, "max_rel_diff": 0.02}
    res = {"device": "cpu", "unet": {
        "variants": {"bf16_autocast": {"status": "ok", "speedup": 2.0, "rel_diff": 0.01},
                     "channels_last_3d": {"status": "ok", "speedup": 1.1, "rel_diff": 0.0}},
        "compile": {"status": "timeout", "reason": "took too long"}},
        "autoencoder_decode": {"bf16_autocast": {"status": "ok", "speedup": 3.0, "rel_diff": 0.05}}}
    rec = recommend(res, rules)
    assert rec["unet_autocast_bf16"] is True  # fast and accurate
    assert rec["channels_last_3d"] is False  # too little gain
    assert rec["compile"] is False and "took too long" in rec["reasons"]["compile"]
    assert rec["autoencoder_autocast_bf16"] is False  # fast but too inaccurate
    assert "5.00%" in rec["reasons"]["autoencoder_autocast_bf16"]


def test_compile_is_capped():
    opts = BenchOptions(preset="tiny", steps=1, repeats=1, warmup=0, device="cpu", threads=1, seed=0, gemm_size=8,
                        gemm_repeats=1, compile_timeout_s=1.0, paper_claim={}, recommend={})
    t0 = time.perf_counter()
    out = bench_compile(opts, CPU)
    assert out["status"] == "timeout" and "compile.timeout_s" in out["reason"]
    assert time.perf_counter() - t0 < 30


@pytest.mark.slow
def test_compile_worker_runs():
    opts = BenchOptions(preset="tiny", steps=1, repeats=1, warmup=0, device="cpu", threads=1, seed=0, gemm_size=8,
                        gemm_repeats=1, compile_timeout_s=590, paper_claim={}, recommend={})
    out = bench_compile(opts, CPU)
    assert out["status"] == "ok", out
    assert out["compile_s"] > 0 and out["s"] > 0 and out["speedup"] > 0
    assert out["rel_diff"] < 1e-3  # compiled fp32 computes the same function


def _positive(d: dict, *keys: str) -> None:
    for k in keys:
        assert d[k] is not None and d[k] > 0, (k, d.get(k))


def test_cli_errors_are_one_line(capsys):
    assert main(["bench", "--preset", "tiny", "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "steps" in err
    if not torch.cuda.is_available():
        assert main(["bench", "--preset", "tiny", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_gemm_peak_shrinks_a_matmul_that_would_take_too_long(monkeypatch) -> None:
    """Emulated bf16 (AVX2: ~1 GFLOP/s) made 21 matmuls of 2048 take minutes: with a tiny call budget the bf16
    peak is timed on a halved matrix and says so; fp32 keeps the full size."""
    import torch

    from ldae.jobs.bench import inference

    monkeypatch.setattr(inference, "GEMM_CALL_BUDGET_S", 1e-12)
    monkeypatch.setattr(inference, "GEMM_PROBE_SIZE", 16)
    out = inference.bench_gemm(torch.device("cpu"), 64, repeats=1)
    assert out["size"] == 64 and out["bf16_size"] == 16 and "timed at 16x16" in out["bf16_note"]
    assert out["fp32_gflops"] > 0 and out["bf16_gflops"] > 0
    monkeypatch.setattr(inference, "GEMM_CALL_BUDGET_S", 1e6)
    full = inference.bench_gemm(torch.device("cpu"), 64, repeats=1)
    assert "bf16_size" not in full and "bf16_note" not in full


def test_bench_tiny_end_to_end(tmp_path: Path, capsys, one_thread):
    out = tmp_path / "bench.json"
    argv = ["bench", "--preset", "tiny", "--steps", "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--no-compile", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Voxel DAE / LDAE" in printed and "Recommended for inference" in printed
    res = json.loads(out.read_text())
    _positive(res["gemm"], "fp32_gflops", "bf16_gflops")
    _positive(res["unet"], "s", "gflop", "gflops", "params")
    assert res["unet"]["latent_shape"] == [3, 8, 10, 8]
    for key in ("bf16_autocast", "channels_last_3d"):
        _positive(res["unet"]["variants"][key], "s", "speedup")
    _positive(res["unet"]["variants"]["bf16_autocast"], "gflops", "fraction_of_bf16_peak")
    assert res["unet"]["variants"]["channels_last_3d"]["rel_diff"] < 1e-4  # same fp32 arithmetic
    assert res["unet"]["compile"]["status"] == "skipped"
    sh = res["shared_step"]
    _positive(sh, "ratio", "flop_ratio")
    assert sh["ratio"] == pytest.approx(sh["separate"]["min_s"] / sh["shared"]["min_s"])
    assert sh["max_abs_diff"] < 1e-4  # sharing the encoder pass does not change ε̂
    assert sh["flop_ratio"] > 1.0  # the separate passes repeat the encoder
    rec = res["reconstruction"]
    for key in ("ldae", "voxel_dae"):
        _positive(rec[key], "s", "per_step_s", "gflop", "extrapolated_s", "extrapolated_gflop")
        assert rec[key]["steps"] == 2 and rec[key]["extrapolated_steps"] == 100
        assert rec[key]["peak_mib"] is None or rec[key]["peak_mib"] > 0
    _positive(rec, "ratio", "flop_ratio", "extrapolated_ratio", "extrapolated_flop_ratio")
    # FLOP bookkeeping: fixed costs + 2 x steps x per-step GFLOP
    g = res["gflop"]
    assert rec["voxel_dae"]["gflop"] == pytest.approx(g["voxel_semantic_encoder"] + 4 * g["voxel_unet"])
    assert rec["ldae"]["extrapolated_gflop"] == pytest.approx(
        g["autoencoder_encode"] + g["semantic_encoder"] + g["autoencoder_decode"] + 200 * g["conditional_step_shared"])
    dec = res["autoencoder_decode"]
    assert dec["image_shape"] == [32, 40, 32]
    _positive(dec["fp32"], "s", "gflops")
    _positive(dec["bf16_autocast"], "s", "speedup")
    assert set(res["recommendation"]) >= {"unet_autocast_bf16", "autoencoder_autocast_bf16", "channels_last_3d",
                                          "compile", "reasons"}


# ----------------------------------------------------------------------------- training steps (--train)


def _rows(peaks: dict[int, float], oom_at: int | None = None, wall: float = 1.0):
    """A fake ``measure(b)``: fixed peak memory per batch size, an out-of-memory error at ``oom_at``."""
    seen: list[int] = []

    def measure(b: int) -> dict:
        seen.append(b)
        if b == oom_at:
            return {"batch": b, "status": "oom", "reason": "CUDA out of memory"}
        return {"batch": b, "status": "ok", "s": 0.1 * b, "peak_mib": peaks.get(b, 100.0 * b), "wall_s": wall}

    return measure, seen


def test_sweep_doubles_until_out_of_memory():
    from ldae.jobs.bench.train import sweep_batches

    measure, seen = _rows({}, oom_at=8)
    rows, stop = sweep_batches(measure, max_batch=64, memory_cap_mib=None, time_budget_s=1e9)
    assert seen == [1, 2, 4, 8] and [r["status"] for r in rows] == ["ok", "ok", "ok", "oom"]
    assert stop["reason"] == "out of memory" and "batch 8" in stop["detail"]
    measure, seen = _rows({})
    rows, stop = sweep_batches(measure, max_batch=4, memory_cap_mib=None, time_budget_s=1e9)
    assert seen == [1, 2, 4] and stop["reason"] == "max_batch"


def test_sweep_memory_cap_measured_and_projected():
    from ldae.jobs.bench.train import sweep_batches

    peaks = {1: 150.0, 2: 200.0, 4: 300.0, 8: 500.0}  # 100 MiB fixed + 50 MiB per sample
    measure, seen = _rows(peaks)
    rows, stop = sweep_batches(measure, max_batch=64, memory_cap_mib=450.0, time_budget_s=1e9)
    # batch 8 projected from 2 and 4: 300 + 2 x (300 - 200) = 500 > 450, so it is never started
    assert seen == [1, 2, 4] and stop["reason"] == "memory cap" and stop["projected_mib"] == pytest.approx(500.0)
    measure, seen = _rows(peaks)
    rows, stop = sweep_batches(measure, max_batch=64, memory_cap_mib=120.0, time_budget_s=1e9)
    assert seen == [1] and rows[0]["status"] == "over memory cap" and stop["reason"] == "memory cap"
    assert "150 MiB" in stop["detail"]


def test_sweep_time_budget():
    from ldae.jobs.bench.train import sweep_batches

    now = [0.0]

    def measure(b: int) -> dict:
        now[0] += 10.0 * b  # each batch size takes 10 s per sample of wall time
        return {"batch": b, "status": "ok", "s": 1.0, "peak_mib": 1.0, "wall_s": 10.0 * b}

    rows, stop = sweep_batches(measure, max_batch=64, memory_cap_mib=None, time_budget_s=100.0, clock=lambda: now[0])
    # after 1, 2, 4 (70 s) batch 8 is projected to take 2 x 40 s more: past 100 s
    assert [r["batch"] for r in rows] == [1, 2, 4] and stop["reason"] == "time budget"


def test_is_out_of_memory():
    from ldae.jobs.bench.train import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_plan_closed_form():
    from ldae.jobs.bench.train import plan

    rows = [{"batch": 1, "status": "ok", "s": 0.5}, {"batch": 2, "status": "ok", "s": 0.8},
            {"batch": 4, "status": "oom"}]
    preset = {"effective_batch": 8, "max_epochs": 10, "train_fraction": 0.89}
    p = plan(rows, preset, scans=1000, devices=1)
    # micro-batch 2 (largest that fits), 4 micro-batches per optimiser step; 890 training scans
    assert (p["micro_batch"], p["accumulate"], p["effective_batch"], p["train_scans"]) == (2, 4, 8, 890)
    assert p["micro_steps_per_epoch"] == 445 and p["optimizer_steps_per_epoch"] == 112
    assert p["epoch_s"] == pytest.approx(445 * 0.8) and p["schedule_s"] == pytest.approx(4450 * 0.8)
    assert p["samples_per_s"] == pytest.approx(2 / 0.8)
    p4 = plan(rows, preset, scans=1000, devices=4)  # share 2 per device, no accumulation
    assert (p4["micro_batch"], p4["accumulate"], p4["effective_batch"]) == (2, 1, 8)
    assert p4["epoch_s"] == pytest.approx(math.ceil(890 / 8) * 0.8)  # linear scaling: ~1/4 of one device
    assert p4["samples_per_s"] == pytest.approx(4 * p["samples_per_s"])
    p16 = plan(rows, preset, scans=1000, devices=16)  # more devices than the effective batch: batch 1 each
    assert (p16["micro_batch"], p16["accumulate"], p16["effective_batch"]) == (1, 1, 16)
    assert plan([{"batch": 1, "status": "oom"}], preset, 1000, 1) is None


def _toy_module(manual: bool):
    """A LightningModule with an EMA copy (EMAStepMixin), or two optimisers stepped by hand like stage 1."""
    import lightning.pytorch as pl

    from ldae.training.ema import EMA, EMAStepMixin

    class Toy(EMAStepMixin, pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)
            self.other = torch.nn.Linear(4, 1)
            self.ema = EMA(self.net, decay=0.5)
            self.steps = 0
            self.automatic_optimization = not manual

        def ema_pairs(self):
            return [(self.ema, self.net)]

        def training_step(self, batch, batch_idx):
            self.steps += 1
            loss = self.net(batch["x"]).pow(2).mean()
            if self.automatic_optimization:
                return loss
            for opt, net in zip(self.optimizers(), (self.net, self.other)):
                self.manual_backward(net(batch["x"]).pow(2).mean())
                opt.step()
                opt.zero_grad()
            return None

        def configure_optimizers(self):
            opts = [torch.optim.SGD(self.net.parameters(), lr=0.1), torch.optim.SGD(self.other.parameters(), lr=0.1)]
            return opts if manual else opts[0]

    return Toy()


@pytest.mark.parametrize("manual", [False, True])
def test_time_training_step_runs_the_modules_steps(manual: bool, one_thread):
    from ldae.jobs.bench.train import time_training_step

    module = _toy_module(manual)
    before = module.net.weight.detach().clone()
    out = time_training_step(module, {"x": torch.ones(3, 4)}, CPU, steps=3, warmup=2)
    assert module.steps == 5 and len(out["runs_s"]) == 3 and out["steps"] == 3 and out["warmup"] == 2
    assert 0 < out["min_s"] <= out["s"]
    assert 0 <= out["cpu_min_s"] <= out["cpu_s"]  # process CPU time of the same steps
    assert not torch.equal(module.net.weight, before)  # optimiser steps ran
    if not manual:
        assert int(module.ema.num_updates) == 5  # the EMA update after every optimiser step
    assert module._trainer is None and all(p.grad is None for p in module.parameters())


def test_train_stage_over_a_forced_small_cap(one_thread):
    """A real stage (tiny latent DDPM) against a 1 MiB memory cap: batch 1 already exceeds it."""
    from ldae.jobs.bench.table import train_rows
    from ldae.jobs.bench.train import bench_train

    topts = TrainOptions(stages=("diffusion",), steps=1, warmup=0, max_batch=4, memory_cap_mib=1.0,
                         time_budget_s=600.0, scans=100, devices=2)
    probe = PeakMemory(CPU)
    with probe:
        pass
    if probe.reason:
        pytest.skip(probe.reason)
    res = bench_train(PresetConfigs.load("tiny"), topts, CPU, seed=0)
    st = res["stages"]["diffusion"]
    assert [r["status"] for r in st["batches"]] == ["over memory cap"] and st["largest_batch"] is None
    assert st["stop"]["reason"] == "memory cap" and st["batches"][0]["peak_mib"] > 1.0
    assert st["plans"] == {"1": None, "2": None} and res["schedule_s"] == {"1": None, "2": None}
    assert st["batches"][0]["s"] > 0 and st["precision"] == "32-true"
    rows = train_rows(res)
    assert any(r[1] == "does not fit" for r in rows) and any("batch 1 does not fit" in r[2] for r in rows)


def test_train_settings_errors(capsys):
    assert main(["bench", "--preset", "tiny", "--train", "--precision", "16-mixed", "--device", "cpu",
                 "--skip", "gemm,unet,variants,shared,recon,voxel,decode,compile"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "16-mixed" in err and "CUDA" in err
    with pytest.raises(ConfigError, match="train.stages"):
        options_from_config(bench_config(), train=True, train_overrides={"stages": ("decoder",)})
    with pytest.raises(ConfigError, match="train.scans"):
        options_from_config(bench_config(), train=True, train_overrides={"scans": 0})
    opts = options_from_config(bench_config(), train=True, train_overrides={"memory_cap_gib": 0.5, "devices": 4})
    assert opts.train.memory_cap_mib == 512.0 and opts.train.devices == 4 and "train" in opts.sections()
    assert "train" not in options_from_config(bench_config()).sections()


@pytest.mark.slow
def test_bench_train_tiny_end_to_end(tmp_path: Path, capsys, one_thread):
    """Every stage of the tiny preset measured at batch 1 and 2 through the CLI, with the projections."""
    out = tmp_path / "train.json"
    argv = ["bench", "--preset", "tiny", "--train", "--max-batch", "2", "--repeats", "1", "--warmup", "0",
            "--threads", "1", "--device", "cpu", "--scans", "500", "--devices", "2",
            "--skip", "gemm,unet,variants,shared,recon,voxel,decode,compile", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Train autoencoder step" in printed and "Training schedule, all stages" in printed
    res = json.loads(out.read_text())
    train = res["train"]
    assert set(train["stages"]) == {"autoencoder", "diffusion", "representation"}
    for stage, st in train["stages"].items():
        assert [r["batch"] for r in st["batches"]] == [1, 2] and all(r["status"] == "ok" for r in st["batches"]), stage
        assert st["largest_batch"] == 2 and st["stop"]["reason"] == "max_batch"
        for r in st["batches"]:
            _positive(r, "s", "samples_per_s")
            assert r["samples_per_s"] == pytest.approx(r["batch"] / r["s"])
        p1, p2 = st["plans"]["1"], st["plans"]["2"]
        assert p1["micro_batch"] * p1["accumulate"] >= st["preset"]["effective_batch"]
        steps = {r["batch"]: r["s"] for r in st["batches"]}
        for p, k in ((p1, 1), (p2, 2)):  # linear scaling: each device runs its micro-batches at the measured step
            assert p["epoch_s"] == pytest.approx(math.ceil(p["train_scans"] / (k * p["micro_batch"]))
                                                 * steps[p["micro_batch"]])
        assert p1["schedule_s"] == pytest.approx(p1["epoch_s"] * st["preset"]["max_epochs"])
        assert st["trainable_params"] > 0
    assert "discriminator" in " ".join(train["stages"]["autoencoder"]["notes"])
    assert train["stages"]["representation"]["frozen_params"] > 0  # the frozen UNet
    assert train["schedule_s"]["1"] == pytest.approx(sum(s["plans"]["1"]["schedule_s"] for s in train["stages"].values()))
    assert "linear scaling" in train["assumption"]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
def test_train_sweep_stops_at_cuda_out_of_memory():
    """A GPU capped to 2 GiB for this process: the small autoencoder's sweep ends in a caught out-of-memory
    error, the memory is given back, and the batches before it are the largest that fits."""
    from ldae.jobs.bench.train import bench_train

    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 2 * 2**30 / total), device)
    try:
        topts = TrainOptions(stages=("autoencoder",), steps=1, warmup=1, max_batch=4096, time_budget_s=300.0,
                             scans=100)
        res = bench_train(PresetConfigs.load("small"), topts, device, seed=0)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    st = res["stages"]["autoencoder"]
    assert st["stop"]["reason"] == "out of memory" and st["batches"][-1]["status"] == "oom"
    assert st["largest_batch"] == st["batches"][-1]["batch"] // 2
    assert all(r["peak_mib"] < 2048 for r in st["batches"] if r["status"] == "ok")
    assert torch.cuda.memory_allocated(device) < 64 * 2**20  # freed after the error


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "32-true"])
def test_train_steps_on_cuda_at_each_precision(precision: str):
    from ldae.jobs.bench.train import bench_train

    if precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    topts = TrainOptions(stages=("diffusion", "representation"), steps=2, warmup=1, max_batch=2, precision=precision,
                         scans=100)
    res = bench_train(PresetConfigs.load("small"), topts, torch.device("cuda"), seed=0)
    for stage, st in res["stages"].items():
        assert st["precision"] == precision and st["largest_batch"] == 2, (stage, st["batches"])
        assert all(r["peak_mib"] > 0 and r["reserved_mib"] >= r["peak_mib"] for r in st["batches"])
