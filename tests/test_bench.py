"""``ldae bench``: measuring tools against closed forms, the timed reconstructions against the library's own
``reconstruct``, the recommendation rules, and the tiny preset end to end."""

from __future__ import annotations

import copy
import json
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
    bench_compile,
    bench_config,
    build_ldae,
    build_voxel_dae,
    count_flops,
    densify,
    ldae_reconstruction,
    options_from_config,
    recommend,
    time_call,
    time_pair,
    voxel_reconstruction,
)

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


def test_timed_reconstructions_are_the_library_reconstructions(one_thread):
    cfgs = _small_tiny_configs()
    x = torch.rand(1, 1, *cfgs.image_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ldae = build_ldae(cfgs, CPU, seed=0)
        ph = Phases(CPU)
        ours = ldae_reconstruction(ldae, x, 2, ph)
        assert set(ph.s) == {"autoencoder_encode", "semantic_encoder", "ddim", "autoencoder_decode"}
        torch.testing.assert_close(ours, ldae.reconstruct(x, steps=2), rtol=0, atol=0)
        voxel = build_voxel_dae(cfgs, CPU, seed=0)
        ph = Phases(CPU)
        ours = voxel_reconstruction(voxel, x, 2, ph)
        assert set(ph.s) == {"semantic_encoder", "ddim"}
        torch.testing.assert_close(ours, voxel.reconstruct(x, steps=2), rtol=0, atol=0)


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
