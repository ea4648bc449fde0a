"""Tiny CLI runs of the flow experiments: every row is written with finite numbers and the targets table."""

import json
import math

import torch

from pylux.experiments import EXPERIMENTS, main
from pylux.experiments.cnf_moons import saved_tensor_bytes


def _finite_summary(path, keys):
    results = json.loads((path / "results.json").read_text())
    for method, stats in results["summary"].items():
        for key in keys:
            mean, std = stats[key]
            assert math.isfinite(mean) and math.isfinite(std), (method, key)
    return results


def test_cnf_moons_quick_run(tmp_path):
    assert EXPERIMENTS["cnf-moons"] == "cnf_moons"
    assert main(["experiments", "cnf-moons", "--quick", "--methods", "rk4-backprop,rk4-reversible",
                 "--out", str(tmp_path)]) == 0
    results = _finite_summary(tmp_path, ("test_nll", "test_nll_tsit5", "memory_mb", "step_time_ms"))
    assert set(results["summary"]) == {"rk4-backprop", "rk4-reversible"}
    (target,) = results["targets"]
    assert target["solver"] == "rk4" and 0 < target["memory_ratio"] < 1  # reversible holds less
    assert (tmp_path / "density.png").exists() or "matplotlib" not in str(results)
    assert "pylux experiments cnf-moons --iterations 3" in (tmp_path / "results.md").read_text()


def test_ffjord_digits_quick_run(tmp_path):
    assert EXPERIMENTS["ffjord-digits"] == "ffjord_digits"
    assert main(["experiments", "ffjord-digits", "--quick", "--methods", "vanilla,vanilla-seminorm,rnode,rnode-fixed",
                 "--out", str(tmp_path)]) == 0
    results = _finite_summary(tmp_path, ("test_bpd", "test_nfe", "train_time_s", "backward_nfe"))
    assert set(results["summary"]) == {"vanilla", "vanilla-seminorm", "rnode", "rnode-fixed"}
    adaptive = {m: runs for m, runs in results["runs"].items() if m != "rnode-fixed"}
    assert all(run["test_nfe"] > 0 and run["backward_nfe"] > 0 for runs in adaptive.values() for run in runs)
    # the fixed grid reaches the training solve: RK4 at dt = 0.25 is 16 evaluations, backprop has no backward solve
    (fixed,) = results["runs"]["rnode-fixed"]
    assert (fixed["train_nfe"], fixed["backward_nfe"]) == (16.0, 0.0) and fixed["test_nfe"] > 0
    assert {r["method"] for r in results["targets"]} == {"rnode", "rnode-fixed", "vanilla-seminorm"}
    assert "Targets" in (tmp_path / "results.md").read_text()


def test_saved_tensor_bytes_counts_what_backward_keeps():
    w = torch.randn(100, 100, requires_grad=True)
    x = torch.randn(100, 100)
    _, one = saved_tensor_bytes(lambda: torch.tanh(x @ w))
    _, three = saved_tensor_bytes(lambda: torch.tanh(torch.tanh(torch.tanh(x @ w) @ w) @ w))
    # 100x100 float32 storages (40000 bytes): x @ w keeps x (for w's gradient) and tanh its output
    assert one == 2 * 40000
    # x, w (kept by the second and third products, counted once) and the three tanh outputs
    assert three == 5 * 40000
    with torch.no_grad():
        _, none = saved_tensor_bytes(lambda: torch.tanh(x @ w))
    assert none == 0
