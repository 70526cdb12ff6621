"""Data-parallel inference (latent export, batch encoding) on Lightning Fabric.

Training scales out through Lightning's Trainer (``--trainer.strategy ddp --trainer.devices N``); the
inference jobs (``ldae compress``, ``ldae encode --csv``) use :func:`launch`, which starts or joins the
processes the same way: ``--devices N`` on one machine spawns N-1 more processes of the same command,
and under ``torchrun``/``srun`` every launched process joins its rank. Each process works on its own
rows (:meth:`Workers.shard`), results meet through :meth:`Workers.gather`, and only the main process
writes the shared outputs (CSV, JSON, merged NPZ).
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ldae.errors import ConfigError, LDAEError, find_user_error

log = logging.getLogger(__name__)
T = TypeVar("T")
_PARENT_ENV = "LDAE_LAUNCHER_PID"  # set by a process that spawns its peers itself (``--devices N``)


@dataclass
class Workers:
    """This process's place among the inference processes."""

    rank: int
    world_size: int
    device: torch.device
    fabric: Any = None  # lightning.fabric.Fabric, absent for a plain single process
    failed: bool = False  # a :meth:`together` call failed on some process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's share of ``items`` (every ``world_size``-th, starting at ``rank``): disjoint
        across processes, together all of them, no padding."""
        return list(items[self.rank :: self.world_size])

    def unshard(self, parts: Sequence[Sequence[T]]) -> list[T]:
        """The inverse of :meth:`shard`: every process's share (``gather`` order) back in the original order."""
        total = sum(len(p) for p in parts)
        return [parts[i % self.world_size][i // self.world_size] for i in range(total)]

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every process, in rank order (any picklable object)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def together(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on every process; when it fails on any of them, it fails on all (with
        the first failure's message), so that no process is left waiting at the next barrier."""
        try:
            result, failure = fn(*args, **kwargs), None
        except Exception as exc:  # noqa: BLE001 - re-raised below, here or on the other processes
            result, failure = None, exc
        if self.world_size == 1:
            if failure is not None:
                raise failure
            return result  # type: ignore[return-value]
        user_error = find_user_error(failure)
        reports = self.gather(None if failure is None else
                              (True, str(user_error)) if user_error is not None else (False, str(failure)))
        self.failed = self.failed or any(r is not None for r in reports)
        if failure is not None:
            raise failure
        for rank, report in enumerate(reports):
            if report is not None:
                user_error, message = report
                raise (LDAEError if user_error else RuntimeError)(f"process {rank} failed: {message}")
        return result  # type: ignore[return-value]

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process."""
        return obj if self.world_size == 1 else self.fabric.broadcast(obj, src=0)

    def close(self) -> None:
        """Tear the process group down while Python is still whole (run at exit by :func:`launch`).

        Left to interpreter shutdown, gloo's threads and the rank-0 store can be destroyed in an order
        that aborts the process ("terminate called without an active exception", exit -6) after the work
        is done. After a failure, a process that the main one spawned also waits (at most a minute) for
        the main process to exit first: Lightning's launcher SIGKILLs the main process as soon as one of
        its children exits non-zero, which would replace the main process's one-line error and exit
        code 2 by a kill.
        """
        destroy_process_group()
        if self.failed and not self.is_main and os.environ.get(_PARENT_ENV) == str(os.getppid()):
            wait_for_exit(os.getppid(), timeout_s=60.0)


def destroy_process_group() -> None:
    """Destroy the default process group if there is one (Lightning does so at exit for NCCL only; gloo
    left to interpreter shutdown can abort the process). Registered at exit by :func:`launch` and by
    the training stages under DDP."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def data_parallel() -> bool:
    """True inside an initialised process group of more than one process (Trainer DDP or :func:`launch`)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the processes with an autograd-aware all-reduce under :func:`data_parallel`, else
    ``t`` itself (for statistics a model needs over the global batch)."""
    if not data_parallel():
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)


def wait_for_exit(pid: int, timeout_s: float, poll_s: float = 0.05) -> bool:
    """Wait until this process's parent ``pid`` has exited (we are re-parented); False on timeout."""
    deadline = time.monotonic() + timeout_s
    while os.getppid() == pid:
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available else CPU; LDAEError for CUDA requested but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device {name!r} (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LDAEError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device: only cpu and cuda are supported, got {name!r}")
    return device


def _accelerator(device: str) -> tuple[str, Any]:
    """``--device`` (cpu, cuda, cuda:1, mps, auto) as Fabric's (accelerator, devices-or-None)."""
    name = device.strip().lower()
    if name == "auto":
        return resolve_device("auto").type, None
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "gpu", "mps"):
        raise ConfigError(f"--device '{device}': expected cpu, cuda, cuda:<index>, mps or auto")
    if index:
        if not index.isdigit():
            raise ConfigError(f"--device '{device}': the device index must be a number")
        return kind, [int(index)]
    return kind, None


def launch(device: str = "cpu", devices: int = 1, num_nodes: int = 1, strategy: str = "auto") -> Workers:
    """Start (or join) ``devices`` × ``num_nodes`` inference processes and return this one's place.

    One device on one node is a plain process (no Fabric, no process group). Otherwise Lightning Fabric
    launches DDP: CPU processes talk over gloo, GPUs over NCCL.
    """
    if int(devices) < 1 or int(num_nodes) < 1:
        raise ConfigError(f"--devices {devices} / --num-nodes {num_nodes}: both must be at least 1")
    accelerator, index = _accelerator(device)
    if int(devices) == 1 and int(num_nodes) == 1:
        kind = "cuda" if accelerator == "gpu" else accelerator
        return Workers(rank=0, world_size=1, device=torch.device(kind if index is None else f"{kind}:{index[0]}"))
    if index is not None:
        raise ConfigError(f"--device '{device}' names one device; with --devices {devices} pass the kind only (e.g. cuda)")
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=accelerator, devices=int(devices), num_nodes=int(num_nodes),
                    strategy="ddp" if strategy == "auto" else strategy)
    if "LOCAL_RANK" not in os.environ:  # not a launched process: Fabric spawns the peers, they inherit this
        os.environ[_PARENT_ENV] = str(os.getpid())
    fabric.launch()
    log.debug("rank %d of %d on %s", fabric.global_rank, fabric.world_size, fabric.device)
    workers = Workers(rank=fabric.global_rank, world_size=fabric.world_size, device=fabric.device, fabric=fabric)
    atexit.register(workers.close)
    return workers


def is_main_process() -> bool:
    """False on every process but rank 0 of an initialised process group (Trainer or Fabric DDP): for
    what only one process should print or write."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    env = os.environ  # a launched process whose group is gone (or not yet made)
    if "RANK" in env:
        return int(env["RANK"]) == 0
    return int(env.get("LOCAL_RANK", 0)) == 0 and int(env.get("NODE_RANK", 0)) == 0
