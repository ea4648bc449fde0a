"""Round-robin timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time


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
