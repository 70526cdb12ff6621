"""``ldae bench``: speed/memory table of a preset's networks (LDAE vs the voxel DAE, side by side) + JSON."""

from __future__ import annotations

import argparse

HELP = "benchmark the preset's networks on this device (UNet step, shared encoder, LDAE vs voxel DAE, decode)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ldae.config import PRESETS

    p.add_argument("--preset", choices=PRESETS, help="networks to build (default: configs/bench.yaml)")
    p.add_argument("--json", help="output JSON (default: configs/bench.yaml json, runs/bench/PRESET.json)")
    p.add_argument("--steps", type=int, help="DDIM steps each way of the reconstruction comparison "
                   "(default per preset in configs/bench.yaml; results are also extrapolated per step to the paper's 100)")
    p.add_argument("--repeats", type=int, help="timed runs per measurement, median reported (default 3)")
    p.add_argument("--warmup", type=int, help="untimed runs before each network micro-benchmark (default 1)")
    p.add_argument("--device", help="cpu, cuda[:i] or auto (default auto)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: every CPU this process may use)")
    p.add_argument("--seed", type=int, help="seed of the random networks and inputs (default 0)")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out: "
                   "gemm,unet,variants,shared,recon,voxel,decode,compile")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile (same as --skip compile)")
    p.add_argument("--compile-timeout", type=float, help="seconds before the torch.compile subprocess is killed (default 600)")


def main(args: argparse.Namespace) -> int:
    from ldae.io import write_json
    from ldae.jobs.bench import bench_config, options_from_config, print_table, run_bench

    cfg = bench_config()
    skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    if args.no_compile:
        skip.append("compile")
    opts = options_from_config(cfg, preset=args.preset, steps=args.steps, repeats=args.repeats, warmup=args.warmup,
                               device=args.device, threads=args.threads, seed=args.seed, skip=tuple(skip),
                               compile_timeout_s=args.compile_timeout)
    results = run_bench(opts)
    print_table(results)
    path = write_json(args.json or str(cfg["json"]).format(preset=opts.preset), results)
    print(f"results: {path}")
    return 0
