"""retain_freed_cpu_memory: the page faults of a solver-like loop with glibc's defaults and with the setting."""

import os
import subprocess
import sys
import textwrap

import pytest

import pylux as lx
from pylux.core import memory

# a loop shaped like an eager Runge-Kutta step on P2: seven 512 x 784 float32 tensors (1.6 MB each) made and
# freed per step; prints the median of the minor page faults per step after a warm-up (the median: the heap's
# growth to its working size can fall into any one step, once)
LOOP = textwrap.dedent("""
    import resource, statistics, sys
    import torch
    import pylux as lx
    applied = lx.retain_freed_cpu_memory() if sys.argv[1] == "retain" else None
    def step(u):
        ks = [u * 1.01]
        for _ in range(6):
            ks.append(torch.tanh(ks[-1] + u))
        return sum(ks) * 0.1
    u = torch.randn(512, 784)
    for _ in range(5):
        u = step(u)
    faults = []
    for _ in range(40):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        u = step(u)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, statistics.median(faults))
""")


def _faults_per_step(mode):
    # glibc's initial mmap threshold (128 KiB), held fixed: glibc adapts it upwards to the largest block freed
    # so far, and whether that has happened by the loop varies from one process start to the next; fixed, it
    # is the state of a process whose history never raised it, every time
    # (and no preloaded allocator nor other malloc settings from the calling environment)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("MALLOC_")}
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, timeout=120, check=True,
                         env=env)
    applied, faults = out.stdout.split()
    return applied, float(faults)


@pytest.mark.skipif(memory._glibc() is None, reason="glibc's malloc only")
def test_retained_memory_ends_the_page_faults_of_a_step_loop():
    _, default = _faults_per_step("default")
    applied, retained = _faults_per_step("retain")
    assert applied == "True"
    # without it each step faults in its tensors' fresh pages (a 1.6 MB tensor is 392 of them)
    assert default > 1000
    assert retained < 10


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    assert lx.retain_freed_cpu_memory() is False


@pytest.mark.parametrize("confstr", [lambda name: None, lambda name: "musl 1.2", "raise"])
def test_only_glibc_is_taken_for_glibc(monkeypatch, confstr):
    """musl (also behind a glibc-compatibility shim that exports gnu_get_libc_version) reports no glibc version."""
    def raising(name):
        raise ValueError("unrecognized configuration name")
    monkeypatch.setattr(memory.sys, "platform", "linux")
    monkeypatch.setattr(memory.os, "confstr", raising if confstr == "raise" else confstr)
    assert memory._glibc() is None


class RecordingLibc:
    """Stands in for glibc: records the mallopt calls, refusing the mmap thresholds above ``mmap_ceiling``."""

    def __init__(self, mmap_ceiling=None):
        self.calls, self.mmap_ceiling = [], mmap_ceiling

    def mallopt(self, option, value):
        self.calls.append((option, value))
        refused = option == memory._M_MMAP_THRESHOLD and self.mmap_ceiling is not None and value > self.mmap_ceiling
        return 0 if refused else 1


def test_sizes_beyond_a_c_int_are_capped_not_wrapped(monkeypatch):
    # ctypes passes a Python int to a C int modulo 2**32 without a word: 2**32 + 5 would set 5 bytes
    libc = RecordingLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    assert lx.retain_freed_cpu_memory(1 << 40) is True
    assert libc.calls == [(memory._M_MMAP_THRESHOLD, 2 ** 31 - 1), (memory._M_TRIM_THRESHOLD, 2 ** 31 - 1)]


def test_an_older_glibc_gets_its_ceiling_for_the_mmap_threshold(monkeypatch):
    libc = RecordingLibc(mmap_ceiling=32 << 20)
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    assert lx.retain_freed_cpu_memory() is True
    assert libc.calls == [(memory._M_MMAP_THRESHOLD, 1 << 30), (memory._M_MMAP_THRESHOLD, 32 << 20),
                          (memory._M_TRIM_THRESHOLD, 1 << 30)]


@pytest.mark.parametrize("bad, error, match", [(-1, ValueError, ">= 33554432 bytes"), (1 << 20, ValueError, "32 MiB"),
                                               (1.5, TypeError, "an integer"), (True, TypeError, "an integer"),
                                               ("1G", TypeError, "an integer")])
def test_bad_retained_sizes_are_refused(bad, error, match):
    with pytest.raises(error, match=match):
        lx.retain_freed_cpu_memory(bad)


def test_numpy_integers_are_sizes(monkeypatch):
    import numpy as np
    libc = RecordingLibc()  # the test process's own malloc is left as it is
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    assert lx.retain_freed_cpu_memory(np.int64(1 << 30)) is True
    assert libc.calls[-1] == (memory._M_TRIM_THRESHOLD, 1 << 30)
