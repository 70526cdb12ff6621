"""Per-stage step times of the demo under CPU settings side by side (issue 19: the demo on 2-core AVX2 CPUs).

What is timed, for a preset (the demo's ``tiny`` by default) with random networks and the preset's own batch
sizes: one optimiser step of each trained stage — the autoencoder with its discriminator step, the latent
DDPM, the representation stage with its frozen UNet — through :func:`ldae.jobs.bench.train.time_training_step`
(the stages' LightningModules in ``Trainer.fit``), and one evaluation-style reconstruction (``recon``):
:meth:`ldae.model.LDAE.encode` + :meth:`~ldae.model.LDAE.decode` (DDIM inversion and sampling, ``ddim_steps``
each way, guided by the semantic encoder and the gradient estimator, decoded by the autoencoder) of the
evaluation's batch of scans, and the same for one scan (``recon1``: what the evaluation's interpolation and
manipulation sections run, one scan at a time).

Variants. A variant is a set of CPU settings applied around each of its measurements:

* ``wgrad``: ``forward`` | ``onednn`` | ``auto`` — the 3D weight-gradient path of
  :mod:`ldae.nets.fast_conv`;
* ``single``: ``true`` | ``false`` — single-volume batches through oneDNN (:mod:`ldae.nets.fast_conv`) or
  PyTorch's own choice (``slow_conv3d``);
* ``threads``: torch intra-op threads;
* ``mkldnn``: ``true`` | ``false`` — ``torch.backends.mkldnn.enabled`` (false: ATen's own convolutions).

The variants are measured in interleaved rounds (round r: every variant once, in order), so that a machine
load that drifts — other jobs on the same cores — hits all of them alike; per variant the median and the
minimum over rounds of the wall and the process CPU time (all threads; with one thread, the time the step
actually ran) are reported, with the ratio of the first variant's time to each variant's (> 1: faster).

With ``cap`` the whole measurement runs twice in child processes, as is and with PyTorch and oneDNN capped
to AVX2 (``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``), and reports both with their ratio; on a
CPU without AVX-512 the cap changes nothing.

Run: ``python -m ldae.jobs.bench.demo_steps --variant before:wgrad=onednn --variant after:wgrad=forward``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ldae.errors import ConfigError

Tensor = torch.Tensor

TRAIN_STAGES = ("autoencoder", "diffusion", "representation")
PARTS = (*TRAIN_STAGES, "recon", "recon1")
CAP_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
KNOBS = ("wgrad", "single", "threads", "mkldnn")


# ----------------------------------------------------------------------------- variants


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``'after:wgrad=forward,threads=2'`` -> ``('after', {'wgrad': 'forward', 'threads': 2})``; ConfigError
    naming the bad part."""
    name, _, spec = text.partition(":")
    if not name or not spec:
        raise ConfigError(f"variant {text!r}: expected NAME:KNOB=VALUE[,KNOB=VALUE] (knobs: {', '.join(KNOBS)})")
    knobs: dict[str, Any] = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key == "wgrad" and value in ("forward", "onednn", "auto"):
            knobs[key] = value
        elif key == "single" and value.lower() in ("true", "false"):
            knobs[key] = value.lower() == "true"
        elif key == "threads" and value.isdigit() and int(value) >= 1:
            knobs[key] = int(value)
        elif key == "mkldnn" and value.lower() in ("true", "false"):
            knobs[key] = value.lower() == "true"
        else:
            raise ConfigError(f"variant {text!r}: bad setting {item!r} (wgrad=forward|onednn|auto, "
                              "single=true|false, threads=N>=1, mkldnn=true|false)")
    return name, knobs


@contextlib.contextmanager
def applied(knobs: dict[str, Any]) -> Iterator[None]:
    """The CPU settings of one variant within the block (the previous ones restored after)."""
    from ldae.nets.fast_conv import single_volume_mode, weight_grad_mode

    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    with contextlib.ExitStack() as stack:
        if "wgrad" in knobs:
            stack.enter_context(weight_grad_mode(knobs["wgrad"]))
        if "single" in knobs:
            stack.enter_context(single_volume_mode(knobs["single"]))
        if "threads" in knobs:
            torch.set_num_threads(int(knobs["threads"]))
        if "mkldnn" in knobs:
            torch.backends.mkldnn.enabled = bool(knobs["mkldnn"])
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.backends.mkldnn.enabled = mkldnn


# ----------------------------------------------------------------------------- the measured parts


def _timed(fn: Callable[[], Any], repeats: int) -> dict:
    """``repeats`` calls of ``fn`` (after one untimed): median/min wall and process CPU seconds."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"s": statistics.median(wall), "min_s": min(wall), "runs_s": wall, "cpu_s": statistics.median(cpu),
            "cpu_min_s": min(cpu)}


def part_runners(preset: str, parts: Sequence[str], steps: int, ddim_steps: int, seed: int,
                 out: Path) -> dict[str, Callable[[], dict]]:
    """For each of ``parts`` a function measuring it once (``steps`` timed steps after one warm-up step, or
    ``steps`` reconstructions after one untimed): ``{'s', 'min_s', 'cpu_s', 'cpu_min_s', ...}``. Networks
    and batches are built here, once, and shared by every variant."""
    from ldae.jobs.bench.options import PresetConfigs
    from ldae.jobs.bench.train import stage_precision, stage_setup, time_training_step

    cfgs = PresetConfigs.load(preset)
    device = torch.device("cpu")
    runners: dict[str, Callable[[], dict]] = {}
    for stage in (p for p in parts if p in TRAIN_STAGES):
        setup = stage_setup(stage, cfgs, device, out / stage, seed)
        batch = setup.batch(int(setup.cfg["data"]["batch_size"]))
        precision = stage_precision(setup, None, device)
        torch.manual_seed(seed)
        module = setup.build()

        def run(module: Any = module, batch: dict = batch, setup: Any = setup, precision: str = precision) -> dict:
            return time_training_step(module, batch, device, precision=precision, steps=steps, warmup=1,
                                      trainer_kwargs=setup.trainer_kwargs)

        runners[stage] = run
    if "recon" in parts or "recon1" in parts:
        from ldae.jobs.bench.models import build_ldae

        model = build_ldae(cfgs, device, seed)
        from ldae.config import load_preset

        n = int(load_preset(preset, "evaluation").get("batch_size", 8))  # the evaluation's batch of scans
        x = torch.rand((n, 1, *cfgs.image_shape), generator=torch.Generator().manual_seed(seed))

        @torch.no_grad()
        def reconstruct(x: Tensor = x) -> Tensor:
            return model.decode(*model.encode(x, ddim_steps), ddim_steps)

        if "recon" in parts:
            runners["recon"] = lambda: _timed(reconstruct, steps)
        if "recon1" in parts:
            runners["recon1"] = lambda: _timed(lambda: reconstruct(x[:1]), steps)
    return runners


def measure(preset: str = "tiny", variants: Sequence[tuple[str, dict]] = (("default", {}),),
            parts: Sequence[str] = PARTS, rounds: int = 3, steps: int = 2, ddim_steps: int = 10,
            seed: int = 0) -> dict:
    """Every part under every variant, ``rounds`` interleaved rounds (module docstring)."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ConfigError(f"unknown part(s) {', '.join(unknown)}: choose from {', '.join(PARTS)}")
    if not variants:
        raise ConfigError("no variants to measure")
    names = [name for name, _ in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"variant names must differ: {', '.join(names)}")
    from ldae.jobs.bench.measure import environment

    res: dict[str, Any] = {"preset": preset, "rounds": rounds, "steps": steps, "ddim_steps": ddim_steps,
                           "variants": {n: k for n, k in variants},
                           "environment": {**environment(torch.device("cpu"), torch.get_num_threads()),
                                           "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                           "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")},
                           "parts": {}}
    with tempfile.TemporaryDirectory(prefix="ldae-demo-steps-") as tmp:
        runners = part_runners(preset, parts, steps, ddim_steps, seed, Path(tmp))
        for part, run in runners.items():
            rows: dict[str, list[dict]] = {n: [] for n in names}
            for _ in range(rounds):
                for name, knobs in variants:
                    with applied(knobs):
                        rows[name].append(run())
            res["parts"][part] = _summarise(rows, names[0])
    return res


def _summarise(rows: dict[str, list[dict]], first: str) -> dict:
    """Per variant: median over rounds of the rounds' medians, minimum of the minima; ratios to ``first``."""
    out = {}
    for name, runs in rows.items():
        out[name] = {"s": statistics.median(r["s"] for r in runs), "min_s": min(r["min_s"] for r in runs),
                     "cpu_s": statistics.median(r["cpu_s"] for r in runs),
                     "cpu_min_s": min(r["cpu_min_s"] for r in runs)}
    base = out[first]
    for entry in out.values():
        entry["speedup"] = base["s"] / entry["s"]
        entry["speedup_min"] = base["min_s"] / entry["min_s"]
        entry["speedup_cpu"] = base["cpu_min_s"] / entry["cpu_min_s"]
    return out


# ----------------------------------------------------------------------------- with and without the AVX2 cap


def measure_capped(argv: Sequence[str]) -> dict:
    """This module's measurement in two child processes, as is and capped to AVX2 (``CAP_ENV``)."""
    out: dict[str, Any] = {}
    for label, extra in (("uncapped", {}), ("capped", CAP_ENV)):
        env = {k: v for k, v in os.environ.items() if k not in CAP_ENV}
        env.update(extra)
        with tempfile.NamedTemporaryFile(suffix=".json") as fh:
            subprocess.run([sys.executable, "-m", "ldae.jobs.bench.demo_steps", *argv, "--json", fh.name],
                           env=env, check=True)
            out[label] = json.loads(Path(fh.name).read_text())
    out["cap"] = CAP_ENV
    out["capped_over_uncapped"] = {
        part: {name: out["capped"]["parts"][part][name]["min_s"] / entry["min_s"] for name, entry in variants.items()}
        for part, variants in out["uncapped"]["parts"].items()}
    return out


# ----------------------------------------------------------------------------- command line


def format_table(res: dict) -> str:
    """One line per part and variant: wall (median, min), CPU (min), speedups against the first variant."""
    lines = [f"{'part':15s} {'variant':12s} {'wall s':>8s} {'min s':>8s} {'cpu min s':>9s} {'x wall':>7s} "
             f"{'x min':>6s} {'x cpu':>6s}"]
    for part, variants in res["parts"].items():
        for name, e in variants.items():
            lines.append(f"{part:15s} {name:12s} {e['s']:8.3f} {e['min_s']:8.3f} {e['cpu_min_s']:9.3f} "
                         f"{e['speedup']:7.2f} {e['speedup_min']:6.2f} {e['speedup_cpu']:6.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldae.jobs.bench.demo_steps", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=("tiny", "small", "paper"))
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    p.add_argument("--variant", action="append", default=[], help="NAME:KNOB=VALUE[,KNOB=VALUE] (repeatable; "
                   "knobs wgrad=forward|onednn|auto, single=true|false, threads=N, mkldnn=true|false); default: the "
                   "settings in force")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round and variant (default 2)")
    p.add_argument("--ddim-steps", type=int, default=10, help="DDIM steps each way of 'recon' (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cap", action="store_true", help="also measure with ATEN_CPU_CAPABILITY=avx2 and "
                   "ONEDNN_MAX_CPU_ISA=AVX2 (child processes)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.ddim_steps < 1:
        p.error("--rounds, --steps and --ddim-steps must be >= 1")
    if args.cap:
        child = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--cap"]
        if "--json" in child:
            i = child.index("--json")
            del child[i:i + 2]
        res = measure_capped(child)
        for label in ("uncapped", "capped"):
            print(f"== {label}\n{format_table(res[label])}")
    else:
        variants = [parse_variant(v) for v in args.variant] or [("default", {})]
        res = measure(args.preset, variants, [s.strip() for s in args.parts.split(",") if s.strip()],
                      args.rounds, args.steps, args.ddim_steps, args.seed)
        print(format_table(res))
    if args.json:
        from ldae.io import write_json

        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
