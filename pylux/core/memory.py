"""Process-wide CPU memory settings that matter to solver loops.

A solver step allocates every stage, combination and error estimate anew, and
frees them when the step ends: on the P2 neural-ODE field of
``benchmarks/suite.py`` (state 512 x 784 float32, 1.6 MB a tensor) that is some
20 tensors of that size per step. glibc's malloc serves such blocks from fresh
``mmap`` regions, or from the top of its heap, which it gives back to the
kernel once more than ``M_TRIM_THRESHOLD`` bytes lie free there; either way the
next step's tensors touch pages the kernel must fault in and zero again (about
5,000 minor page faults, 20 MB zeroed, per compiled P2 solve; 9,600 per eager
one). glibc adapts its mmap threshold upwards to the largest block freed so far,
so how often this happens depends on the process's history. PyTorch's CPU
allocator passes allocations straight to malloc and keeps no cache of its own.
"""

from __future__ import annotations

import ctypes
import operator
import os
import sys

__all__ = ["retain_freed_cpu_memory"]

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: the ceiling of glibc's adaptive mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX), and of what
#: older glibc releases accept from mallopt
_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * 8
#: the least ``max_retained``: a P2 step frees some 20 state-sized tensors (~32 MB); a heap that keeps less
#: gives part of every step back and faults it in again (``max_retained=0`` faulted more than glibc's defaults)
MIN_RETAINED = _MMAP_THRESHOLD_MAX
_C_INT_MAX = 2 ** 31 - 1


def _glibc():
    """The process's own C library when it is glibc (``mallopt`` bound from the running process), else ``None``
    (macOS, Windows, musl, also with glibc-compatibility shims, which ``confstr`` does not report as glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):
        return None
    if not version or not version.startswith("glibc"):
        return None
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc


def retain_freed_cpu_memory(max_retained: int = 1 << 30) -> bool:
    """Keep the memory that freed CPU tensors leave inside the process, so the next solver step reuses warm pages.

    Sets glibc malloc's ``M_TRIM_THRESHOLD`` to ``max_retained`` (the heap keeps up to that many free bytes at its
    top instead of returning them to the kernel) and ``M_MMAP_THRESHOLD`` to the same (blocks up to that size come
    from the heap, not from fresh ``mmap`` regions; older glibc releases accept at most 32 MiB there, and then a
    tensor larger than 32 MiB still gets fresh pages at every allocation); see this module's docstring for why a
    solver loop needs it. Both are capped at 2**31 - 1 bytes (mallopt takes a C int). Equivalent to starting
    Python with ``MALLOC_MMAP_THRESHOLD_=<max_retained> MALLOC_TRIM_THRESHOLD_=<max_retained>``; linking jemalloc
    or tcmalloc (``LD_PRELOAD``) is another way to the same end, and under such a preload this function still
    sets glibc's parameters, which then govern nothing.

    Measured (``python benchmarks/cpu_memory.py``, two runs: 4 fresh processes of each kind, alternating, one
    thread, the P2 Kelly field of ``benchmarks/suite.py``): the eager forward solve 0.86-0.89x the time
    (79.0 -> 68.3 ms, 75.5 -> 67.6 ms), the ``compile=True`` solve 0.84-0.90x (58.2 -> 48.7 ms, 53.3 -> 47.9 ms),
    a DirectAdjoint training step 0.98x, minor page faults 0.07x. glibc raises its mmap threshold to the
    largest block freed so far, so a process whose history has already freed a larger block can behave much
    like this setting (in ``benchmarks/suite.py``, a long run, ``--retain-memory`` made no difference beyond
    the run-to-run noise): the setting makes that case certain.

    The setting is process-wide and stays until the process ends (glibc cannot restore its adaptive threshold):
    the process keeps up to ``max_retained`` freed bytes after a large temporary, as a GPU caching allocator
    does. CUDA tensors are unaffected (PyTorch's CUDA allocator caches already). Call it once, early, from an
    application or a script; a library should leave the choice to its user.

    Args:
        max_retained: bytes of free heap kept in the process, an integer ≥ ``MIN_RETAINED`` (32 MiB: less gives
            part of every step's memory back).

    Returns:
        ``True`` when applied; ``False`` where the C library is not glibc (macOS, Windows, musl), and nothing changed.
    """
    bad_type = TypeError(f"retain_freed_cpu_memory: max_retained must be an integer (bytes), got {max_retained!r}")
    if isinstance(max_retained, bool):
        raise bad_type
    try:
        size = operator.index(max_retained)
    except TypeError:
        raise bad_type from None
    if size < MIN_RETAINED:
        raise ValueError(f"retain_freed_cpu_memory: max_retained must be >= {MIN_RETAINED} bytes (32 MiB), got "
                         f"{size}: a smaller heap gives part of every solver step's memory back")
    libc = _glibc()
    if libc is None:
        return False
    size = min(size, _C_INT_MAX)
    # mallopt returns 1 on success, 0 when glibc refuses the value (older releases cap the mmap threshold)
    mmap_set = libc.mallopt(_M_MMAP_THRESHOLD, size) or libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    return bool(mmap_set) and bool(libc.mallopt(_M_TRIM_THRESHOLD, size))
