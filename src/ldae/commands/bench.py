"""``ldae bench``: speed/memory table of a preset's networks (LDAE vs the voxel DAE, side by side) + JSON."""

from __future__ import annotations

import argparse

HELP = ("benchmark the preset's networks on this device (UNet step, shared encoder, LDAE vs voxel DAE, decode; "
        "--train: training steps, largest batch, projected schedule)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ldae.config import PRESETS

    p.add_argument("--preset", choices=PRESETS, help="networks to build (default: configs/bench.yaml)")
    p.add_argument("--json", help="output JSON (default: configs/bench.yaml json, runs/bench/PRESET.json)")
    p.add_argument("--steps", type=int, help="DDIM steps each way of the reconstruction comparison "
                   "(default per preset in configs/bench.yaml; results are also extrapolated per step to the paper's 100)")
    p.add_argument("--repeats", type=int, help="timed runs per measurement, median reported (default 3; with "
                   "--train also the timed steps per batch size, default train.steps)")
    p.add_argument("--warmup", type=int, help="untimed runs before each network micro-benchmark (default 1; with "
                   "--train also the untimed steps per batch size, default train.warmup)")
    p.add_argument("--device", help="cpu, cuda[:i] or auto (default auto)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: every CPU this process may use)")
    p.add_argument("--seed", type=int, help="seed of the random networks and inputs (default 0)")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out: "
                   "gemm,unet,variants,shared,recon,voxel,decode,train,compile")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile (same as --skip compile)")
    p.add_argument("--compile-timeout", type=float, help="seconds before the torch.compile subprocess is killed (default 600)")
    t = p.add_argument_group("training steps (--train)")
    t.add_argument("--train", action="store_true", help="also time one optimiser step of each stage at batch "
                   "1, 2, 4, ... until memory runs out, and project the preset's schedule")
    t.add_argument("--precision", choices=("preset", "32-true", "bf16-mixed", "16-mixed"),
                   help="training precision (default: each stage's trainer.precision)")
    t.add_argument("--scans", type=int, help="cohort size for the projected epoch/schedule times "
                   "(default: configs/bench.yaml train.scans)")
    t.add_argument("--devices", type=int, help="devices under DDP for the projection (linear scaling; default 1)")
    t.add_argument("--memory-cap", type=float, metavar="GIB",
                   help="CPU: stop the batch sweep above this peak memory growth (default train.cpu_memory_cap_gib)")
    t.add_argument("--max-batch", type=int, help="largest batch size tried (default train.max_batch)")
    t.add_argument("--train-budget", type=float, metavar="S",
                   help="seconds per stage after which no larger batch is started (default train.time_budget_s)")
    t.add_argument("--train-stages", help="comma-separated stages to time (default autoencoder,diffusion,"
                   "representation; voxel_dae too)")


def main(args: argparse.Namespace) -> int:
    from ldae.io import write_json
    from ldae.jobs.bench import bench_config, options_from_config, print_table, run_bench

    cfg = bench_config()
    skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    if args.no_compile:
        skip.append("compile")
    stages = tuple(s.strip() for s in args.train_stages.split(",") if s.strip()) if args.train_stages else None
    train = {"precision": args.precision, "scans": args.scans, "devices": args.devices,
             "memory_cap_gib": args.memory_cap, "max_batch": args.max_batch, "stages": stages,
             "time_budget_s": args.train_budget, "steps": args.repeats, "warmup": args.warmup}
    opts = options_from_config(cfg, preset=args.preset, steps=args.steps, repeats=args.repeats, warmup=args.warmup,
                               device=args.device, threads=args.threads, seed=args.seed, skip=tuple(skip),
                               compile_timeout_s=args.compile_timeout, train=args.train, train_overrides=train)
    results = run_bench(opts)
    print_table(results)
    path = write_json(args.json or str(cfg["json"]).format(preset=opts.preset), results)
    print(f"results: {path}")
    return 0
