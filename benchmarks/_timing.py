"""Round-robin timing shared by the benchmark scripts."""

from __future__ import annotations

import os
import statistics
import time


def pin_cores(threads: int) -> str:
    """Restrict the calling thread, and the threads it starts afterwards, to the first ``threads`` CPUs.

    ``torch.set_num_threads(n)`` bounds torch's intra-op pool, but XLA (JAX, hence diffrax) sizes its
    own pool by the CPUs the process may run on and ignores ``OMP_NUM_THREADS``: on the 2-core CI
    machine a diffrax row used both cores while every torch row used one. Pinning the main thread at
    start-up, before JAX runs anything (its pool starts with the backend and inherits the CPUs),
    gives every library the same ``threads`` cores; threads already running keep theirs. It also
    stops the scheduler from moving a single-threaded torch row between cores (its f then times
    1.7 ms instead of 2.5-4.4 ms on P2). Returns the cores, for the header; where the platform
    cannot pin (no ``os.sched_setaffinity``), nothing changes and ``"unpinned"`` is returned.
    """
    if not hasattr(os, "sched_setaffinity"):
        return "unpinned"
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[:max(1, threads)]
    os.sched_setaffinity(0, chosen)
    return "cores " + ",".join(map(str, chosen))


def interleaved(cases: dict, repeats: int, warmup: int = 3) -> dict:
    """``{key: (median ms, last output)}`` of each callable, after ``warmup`` untimed runs each, timed round-robin.

    Interleaving the cases makes a slow period of a shared machine hit all of
    them alike instead of whichever happened to be running.
    """
    outputs = {}
    for key, fn in cases.items():
        for _ in range(warmup):
            outputs[key] = fn()
    samples = {key: [] for key in cases}
    for _ in range(repeats):
        for key, fn in cases.items():
            start = time.perf_counter()
            out = fn()
            outputs.setdefault(key, out)
            samples[key].append(time.perf_counter() - start)
    return {key: (statistics.median(samples[key]) * 1e3, outputs[key]) for key in cases}
