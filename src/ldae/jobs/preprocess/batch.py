"""A batch of scans in a process pool: finished outputs with the same settings are skipped (resumable),
one failing scan is reported without stopping the others."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ldae.data.ants import set_worker_threads
from ldae.errors import LDAEError
from ldae.jobs.preprocess.bids import ScanInput
from ldae.jobs.preprocess.config import config_fingerprint
from ldae.jobs.preprocess.scan import ScanResult, is_finished, preprocess_scan
from ldae.jobs.preprocess.steps import require_ants


def _threads_per_worker(cfg: dict, workers: int) -> int:
    if int(cfg.get("threads", 0)) > 0:
        return int(cfg["threads"])
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _preprocess_or_report(input_path: Path, output: Path, cfg: dict) -> ScanResult:
    """Worker entry: never raises, so one bad scan does not stop the batch."""
    start = time.perf_counter()
    try:
        return preprocess_scan(input_path, output, cfg)
    except Exception as exc:  # noqa: BLE001 - collected and listed at the end of the batch
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not isinstance(exc, LDAEError):
            message = f"{type(exc).__name__}: {message}"
        return ScanResult(input_path, output, "failed", seconds=round(time.perf_counter() - start, 2),
                          error=message)


def run_batch(
    scans: Sequence[ScanInput],
    outputs: Sequence[Path],
    cfg: dict,
    workers: int = 1,
    overwrite: bool = False,
    on_result: Callable[[ScanResult], None] | None = None,
) -> list[ScanResult]:
    """Preprocess ``scans`` into ``outputs`` with ``workers`` processes; finished outputs with the same
    settings are skipped unless ``overwrite``. Failures are returned, not raised. ``on_result`` is
    called once per scan as it completes (e.g. to advance a progress bar).

    ITK fixes its thread count when ``ants`` is first imported (:mod:`ldae.data.ants`), so the thread count of
    an in-process run is set before that import: importing first would leave it at ldae's repeatable default
    of one thread."""
    in_process = workers <= 1
    if in_process:
        set_worker_threads(_threads_per_worker(cfg, workers))
    require_ants()
    fingerprint = config_fingerprint(cfg)
    results: list[ScanResult] = []
    todo: list[tuple[Path, Path]] = []
    for scan, output in zip(scans, outputs):
        meta = None if overwrite else is_finished(Path(output), fingerprint)
        if meta is not None:
            result = ScanResult(scan.path, Path(output), "skipped", meta.get("qc", {}), meta.get("warnings", []))
            results.append(result)
            if on_result:
                on_result(result)
        else:
            todo.append((scan.path, Path(output)))
    threads = _threads_per_worker(cfg, workers)
    if in_process or len(todo) <= 1:
        set_worker_threads(threads)  # no effect once ants is imported: a pool left one scan runs it on one thread
        for input_path, output in todo:
            result = _preprocess_or_report(input_path, output, cfg)
            results.append(result)
            if on_result:
                on_result(result)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=set_worker_threads,
                                 initargs=(threads,)) as pool:
            futures = [pool.submit(_preprocess_or_report, i, o, copy.deepcopy(cfg)) for i, o in todo]
            for future in as_completed(futures):
                result = future.result()
                results.append(result)
                if on_result:
                    on_result(result)
    order = {Path(o): k for k, o in enumerate(outputs)}
    return sorted(results, key=lambda r: order.get(r.output, 0))
