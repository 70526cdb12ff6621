"""Argument groups shared by several subcommands (a private helper: subcommand modules never import
each other)."""

from __future__ import annotations

import argparse


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    """``--devices`` / ``--num-nodes``: data-parallel inference processes (see ldae.distributed)."""
    p.add_argument("--devices", type=int, default=1,
                   help="processes per node, one per device (default 1; >1 launches DDP: gloo on CPU, NCCL on GPU)")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes (with torchrun/srun; default 1)")
