"""benchmarks/_timing.py: the core pinning every benchmark run gets (same cores for torch and JAX)."""

import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_pin_cores_restricts_the_process_and_its_later_threads():
    # in a child process: pinning the test runner itself would slow the rest of the suite
    code = (
        "import os, sys, threading\n"
        f"sys.path.insert(0, {BENCHMARKS!r})\n"
        "from _timing import pin_cores\n"
        "first = sorted(os.sched_getaffinity(0))[0]\n"
        "label = pin_cores(1)\n"
        "seen = []\n"
        "t = threading.Thread(target=lambda: seen.append(sorted(os.sched_getaffinity(0))))\n"
        "t.start(); t.join()\n"
        "print(label, sorted(os.sched_getaffinity(0)), seen[0], first)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    label, first = " ".join(out[:2]), out[-1]
    assert label == f"cores {first}"
    assert out[2] == f"[{first}]"  # the process
    assert out[3] == f"[{first}]"  # a thread started after pinning (XLA's pool starts with the backend)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_pin_cores_never_asks_for_more_cores_than_allowed():
    code = (
        f"import os, sys; sys.path.insert(0, {BENCHMARKS!r})\n"
        "from _timing import pin_cores\n"
        "n = len(os.sched_getaffinity(0))\n"
        "pin_cores(n + 5); print(len(os.sched_getaffinity(0)) == n)\n"
        "pin_cores(0); print(len(os.sched_getaffinity(0)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "1"]
