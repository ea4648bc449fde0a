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
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
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


@pytest.mark.parametrize("bad, error, match", [(-1, ValueError, ">= 0 bytes"), (1.5, TypeError, "an int"),
                                               (True, TypeError, "an int"), ("1G", TypeError, "an int")])
def test_bad_retained_sizes_are_refused(bad, error, match):
    with pytest.raises(error, match=match):
        lx.retain_freed_cpu_memory(bad)
