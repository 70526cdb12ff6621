"""Layout of a full LDAE run folder (what ``ldae pipeline`` writes and ``LDAE.load`` reads)::

    RUN/autoencoder/      stage 1 run (checkpoints/best.ckpt, config.yaml, figures/)
    RUN/latents/          `ldae compress` output (cohort_with_compressed_latent.csv, latent_meta.json, *.npz)
    RUN/diffusion/        stage 2 run
    RUN/representation/   stage 3 run
    RUN/voxel_dae/        baseline: voxel-space diffusion autoencoder (optional)
    RUN/supervised/       baseline: the same encoder trained with labels (optional)
    RUN/evaluation/       `ldae evaluate` output (metrics.json, probes, figures)

A stage folder may also be given directly wherever a run is expected.
"""

from __future__ import annotations

from pathlib import Path

from ldae.config import BASELINES, STAGES
from ldae.errors import CheckpointError

#: the folder of each part of a run, named after it (docstring above)
STAGE_DIRS = {name: name for name in (STAGES[0], "latents", *STAGES[1:], *BASELINES, "evaluation")}
COMPRESSED_CSV = "cohort_with_compressed_latent.csv"
LATENT_META = "latent_meta.json"


def stage_dir(run: str | Path, stage: str) -> Path:
    """``RUN/<stage>`` for a full run folder."""
    return Path(run) / STAGE_DIRS[stage]


def run_folder(path: str | Path) -> Path:
    """The full run folder that ``path`` names: a run folder itself, one of its stage folders
    (``RUN/representation``), or a checkpoint in one (``RUN/<stage>/checkpoints/best.ckpt``). A stage folder
    is recognised by its ``checkpoints/`` subfolder and a stage name; anything else is returned as is."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    if p.name == "checkpoints":
        p = p.parent
    if p.name in STAGE_DIRS.values() and (p / "checkpoints").is_dir():
        p = p.parent
    return p


def find_checkpoint(run: str | Path, stage: str, which: str = "best") -> Path:
    """The ``which`` (best/last) checkpoint of ``stage`` in a full run folder, a stage folder, or a
    checkpoint path itself; CheckpointError saying what was looked for otherwise."""
    run = Path(run)
    if run.is_file():
        return run
    candidates = [
        run / STAGE_DIRS[stage] / "checkpoints" / f"{which}.ckpt",
        run / "checkpoints" / f"{which}.ckpt",
    ]
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError(
        f"{run}: no {stage} checkpoint found (looked for {', '.join(str(c) for c in candidates)})"
    )


# ----------------------------------------------------------------------------------------------- locks
LOCK_FILE = "ldae.lock"
_held: dict[str, int] = {}  # lock files this process holds -> nesting depth


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _lock_owner(path: Path) -> dict:
    import json

    try:
        info = json.loads(path.read_text() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """An exclusive lock on a run (or stage) folder: ``FOLDER/ldae.lock`` holding ``{pid, host, since, what}``,
    removed on exit. It is created atomically *with* its content: written to a temporary name
    (:func:`ldae.io.write_text`), then hard-linked to the lock name, which fails when the lock exists
    (``link(2)`` is exclusive like ``open(O_CREAT | O_EXCL)``, and no reader ever sees an empty lock).

    Two ldae processes writing one folder (two ``ldae pipeline --out X``, or ``fit`` into a folder a pipeline
    is training) would interleave checkpoints and CSV logs; the second one stops with an LDAEError naming
    the holder instead. A lock whose process is gone (same host, pid not alive: a ``kill -9``) is stale and
    taken over with a warning. Re-entrant within one process (the pipeline holds ``RUN`` while ``fit``
    locks ``RUN/autoencoder``; the same folder twice just nests). Only the main process of a distributed
    job locks (:func:`ldae.distributed.is_main_process`); the folder must exist.
    """

    def __init__(self, folder: str | Path, what: str = "ldae") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.what = what
        self._mine = False

    def acquire(self) -> RunLock:
        import json
        import logging
        import os
        import socket
        import time

        from ldae.distributed import is_main_process
        from ldae.errors import LDAEError

        if not is_main_process():
            return self
        key = str(self.path.resolve())
        if key in _held:
            _held[key] += 1
            self._mine = True
            return self
        host = socket.gethostname()
        info = {"pid": os.getpid(), "host": host, "since": time.strftime("%Y-%m-%d %H:%M:%S"), "what": self.what}
        from ldae.io import write_text

        for attempt in range(3):
            tmp = self.folder / f".{LOCK_FILE}.{os.getpid()}.{attempt}"
            try:
                write_text(tmp, json.dumps(info))
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    raise
                except OSError:  # a file system without hard links: exclusive create, then the content
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    os.write(fd, json.dumps(info).encode())
                    os.close(fd)
            except FileExistsError:
                owner = _lock_owner(self.path)
                pid = owner.get("pid")
                if isinstance(pid, int) and owner.get("host") == host and not _pid_alive(pid):
                    logging.getLogger(__name__).warning("%s: removing the stale lock of process %d (gone)",
                                                        self.folder, pid)
                    self.path.unlink(missing_ok=True)
                    continue
                holder = (f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} since {owner.get('since', '?')}"
                          f" ({owner.get('what', 'ldae')})")
                raise LDAEError(f"{self.folder}: another ldae process is writing this folder ({holder}); wait "
                                f"for it to finish, or delete {self.path} if that process is gone") from None
            finally:
                tmp.unlink(missing_ok=True)
            _held[key] = 1
            self._mine = True
            return self
        raise LDAEError(f"{self.folder}: cannot take the lock {self.path}")

    def release(self) -> None:
        if not self._mine:
            return
        key = str(self.path.resolve())
        self._mine = False
        _held[key] -= 1
        if _held[key] <= 0:
            import os

            del _held[key]
            if _lock_owner(self.path).get("pid") == os.getpid():  # never remove another process's lock
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
