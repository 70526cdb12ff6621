"""``ldae bench``: speed and memory of a preset's networks and training steps, side by side, on this device.

What is measured (randomly initialised networks built from the preset's stage configs through the library's
own classes; no trained weights needed), one module per job:

- ``options``   settings: ``configs/bench.yaml`` + flags (:class:`BenchOptions`), the preset's stage configs;
- ``measure``   the tools: device-synchronised timing, FLOP counting, peak memory, per-phase time of a
  model's own methods, the machine's facts;
- ``models``    the benchmarked models: :class:`ldae.model.LDAE` and :class:`ldae.baselines.voxel_dae.VoxelDAE`
  holding random networks of the preset;
- ``flops``     GFLOP of every call, counted on the meta device;
- ``inference`` ``gemm`` (matmul peak), ``unet`` (one ε_θ step: latency, GFLOP/s), ``variants`` (bf16
  autocast, channels-last-3d), ``shared`` (the conditional step with one encoder pass vs two), ``decode``
  (autoencoder decode, fp32 and bf16: time and peak memory);
- ``reconstruction`` ``recon`` / ``voxel``: ``LDAE.reconstruct`` against ``VoxelDAE.reconstruct`` (N DDIM
  steps each way), per phase, extrapolated to the paper's step count;
- ``train``     ``--train``: one optimiser step of each stage's LightningModule at batch 1, 2, 4, … until
  memory runs out, the largest batch, samples/s, and the preset's schedule projected for N scans on K devices;
- ``compile``   ``torch.compile`` of the UNet in a subprocess with a time cap;
- ``recommend`` inference settings worth their speed-up; ``table`` the printed table; ``driver`` the run.

Conventions: times are medians over ``repeats`` runs; peak memory is the increase over the call (CPU
resident set, CUDA allocated tensors); the JSON holds every number the table shows.
"""

from ldae.jobs.bench.compile import bench_compile
from ldae.jobs.bench.driver import run_bench
from ldae.jobs.bench.measure import PeakMemory, Phases, count_flops, densify, time_call, time_pair
from ldae.jobs.bench.models import build_ldae, build_unet, build_voxel_dae
from ldae.jobs.bench.options import (
    PRECISIONS,
    SECTIONS,
    TRAIN_STAGES,
    BenchOptions,
    PresetConfigs,
    TrainOptions,
    bench_config,
    options_from_config,
)
from ldae.jobs.bench.recommend import recommend
from ldae.jobs.bench.table import print_table, table_rows

__all__ = [
    "PRECISIONS", "SECTIONS", "TRAIN_STAGES", "BenchOptions", "PeakMemory", "Phases", "PresetConfigs", "TrainOptions",
    "bench_compile", "bench_config", "build_ldae", "build_unet", "build_voxel_dae", "count_flops", "densify",
    "options_from_config", "print_table", "recommend", "run_bench", "table_rows", "time_call", "time_pair",
]
