"""The encode stage: cluster one tensor by its `Spec` (`wcfmt.cluster`), in worker processes.

`Spec` is the plan's decision for one tensor (encoder, step or K, codebook rows, calibration
statistics, row weights); `cluster_spec` turns a dense tensor and its spec into the
`ClusteredTensor` the writer stores (labels and fp16 tables, spec §5). `Clusterer` runs that in
a pool of worker processes so that packing uses every core; workers die with their parent.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

import torch

from ..clustered_tensor import ClusteredTensor
from ..constants import DEFAULT_STORAGE_CHUNK_ROWS

__all__ = ["Spec", "Clusterer", "cluster_for_storage", "cluster_spec", "release_free_memory", "CALIB_REFIT"]

#: With ``calib``: after the calibrated labelling, replace each table by its cells'
#: diag(H)-weighted means (measured on SmolLM2 with tools/eval_smollm2.py --calib; README "Calibration").
CALIB_REFIT: bool = True

#: Below this much source data, starting worker processes costs more than it saves.
PROCESS_POOL_MIN_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Spec:
    """How one tensor is clustered: ``k`` (exact k-means) or ``step`` (entropy-constrained), and
    with calibration the inputs' second moments H of its layer."""

    k: int | None
    step: float | None
    chunk_rows: int | None
    hessian: Any = None
    #: one importance per row (shape (rows, 1)): an embedding's token frequencies
    importance: Any = None


def cluster_for_storage(
    t: torch.Tensor, k: int | None, chunk_rows: int | None, threads: int | None, *, bits: float | None = None,
    step: float | None = None, importance: Any = None,
) -> ClusteredTensor:
    """Cluster with one codebook per ``chunk_rows`` rows (None: per tensor), stored in chunks of at
    most DEFAULT_STORAGE_CHUNK_ROWS rows so that loading decodes in parallel and by row range.
    One of ``k``, ``bits``, ``step`` (as `wcfmt.cluster_tensor`, as is ``importance``)."""
    from ..cluster import cluster_tensor

    ct = cluster_tensor(t, k, chunk_rows, bits=bits, step=step, threads=threads, importance=importance)
    storage = DEFAULT_STORAGE_CHUNK_ROWS
    if ct.chunk_rows > storage and (len(ct.centroids) == 1 or ct.chunk_rows % storage == 0):
        ct = ct.rechunk(storage)
    return ct


def cluster_spec(t: torch.Tensor, spec: Spec, threads: int | None) -> ClusteredTensor:
    """``t`` clustered as ``spec`` says, calibrated labels and tables when it carries H."""
    ct = cluster_for_storage(t, spec.k, spec.chunk_rows, threads, step=spec.step, importance=spec.importance)
    if spec.hessian is not None:
        from ..cluster.calibrate import calibrate_clustered

        lam = float(ct.quality.get("lambda", 0.0)) if ct.quality else 0.0
        ct = calibrate_clustered(ct, t, spec.hessian, lam=lam, refit=CALIB_REFIT)
    return ct


def _cluster_in_worker(t: torch.Tensor, spec: Spec) -> ClusteredTensor:
    return cluster_spec(t, spec, 1)


def _worker_init(parent: int) -> None:
    # Nothing outlives a kill: a worker whose parent dies (SIGKILL leaves it no time to shut the
    # pool down) would otherwise sleep forever on its call queue, holding its memory.
    _die_with_parent(parent)
    # One torch thread per worker: two workers with two OpenMP threads each ran no faster than
    # one process (10.9 s vs 10.8 s for SmolLM2-135M); with one each, 5.4 s against 10.1 s.
    # numpy's BLAS likewise (calibration's Cholesky factors and block updates): SmolLM2
    # `--bits 5.43 --calib FILE` on 2 cores took 100 s with its default threads, 63 s with one
    # per worker, same bytes.
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)


#: prctl(2) option: the signal a process gets when its parent dies (Linux).
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Exit at once, without a traceback, when process ``parent`` dies: Linux's parent-death
    signal (SIGKILL) where prctl is there, else a thread that watches ``os.getppid()``."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        def watch() -> None:
            import time

            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="wcfmt-parent-watch", daemon=True).start()


def _worker_ready() -> None:
    return None


def release_free_memory() -> None:
    """Hand the C heap's free memory back to the system (glibc's ``malloc_trim``; elsewhere
    nothing). Stages that allocate and free much from several threads (calibration beside the
    allocation) leave it in per-thread arenas, where it counts in the RSS while later stages run."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Clusterer:
    """Clusters tensors in worker processes, so that packing uses every core.

    The exact k-means makes many small numpy calls that hold the GIL, so threads barely help
    (measured: +10-20% with two); processes scale (SmolLM2-135M on 2 cores: 10.7 s -> 7.2 s,
    identical bytes). Up to ``workers`` tensors are in flight, so peak memory is about
    (workers + 1) x the largest tensor. Inputs under 64 MB cluster in-process. Workers exit
    when the packing process dies, however it dies (`_die_with_parent`).
    """

    def __init__(self, threads: int | None, source_bytes: int) -> None:
        if threads:
            self.workers = threads
        elif hasattr(os, "sched_getaffinity"):
            self.workers = len(os.sched_getaffinity(0))
        else:
            self.workers = os.cpu_count() or 1
        self._pool: Any = None
        if self.workers >= 2 and source_bytes >= PROCESS_POOL_MIN_BYTES:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # fork where there is one: no re-import of the caller's __main__ (an unguarded script
            # would run again in every worker under spawn/forkserver). The workers are forked
            # here, before pack starts any thread of its own.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context(method), initializer=_worker_init,
                                             initargs=(os.getpid(),))
            for f in [self._pool.submit(_worker_ready) for _ in range(self.workers)]:
                f.result()
        self.depth = self.workers if self._pool is not None else 0
        self._threads = threads

    def submit(self, t: torch.Tensor, spec: Spec) -> Any:
        """Return a future (pool) or a finished ClusteredTensor (in-process)."""
        if self._pool is not None:
            return self._pool.submit(_cluster_in_worker, t, spec)
        return cluster_spec(t, spec, self._threads)

    def __enter__(self) -> "Clusterer":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
