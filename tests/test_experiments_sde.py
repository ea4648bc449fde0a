"""Tiny CLI runs of the neural-SDE experiments: the summary files exist and hold finite numbers."""

import json
import math

from pylux.experiments import EXPERIMENTS, main


def _finite_summary(path, keys):
    results = json.loads((path / "results.json").read_text())
    assert (path / "results.md").exists()
    for method, stats in results["summary"].items():
        for key in keys:
            mean, std = stats[key]
            assert math.isfinite(mean) and math.isfinite(std), (method, key)
    return results


def test_sde_spiral_cli_runs_every_row(tmp_path):
    assert EXPERIMENTS["sde-spiral"] == "sde_spiral"
    assert main(["experiments", "sde-spiral", "--iterations", "2", "--seeds", "1", "--trajectories", "4",
                 "--data-trajectories", "50", "--out", str(tmp_path)]) == 0
    results = _finite_summary(tmp_path, ("loss", "predict_nfe", "predict_time_s", "train_time_s"))
    assert set(results["summary"]) == {"vanilla", "ernsde", "srnsde", "local-unbiased", "local-biased"}
    assert all(run["predict_nfe"] > 0 for runs in results["runs"].values() for run in runs)
    assert "pylux experiments sde-spiral --iterations 2 --seeds 1" in (tmp_path / "results.md").read_text()
    assert len(results["data"]["mean"]) == 30


def test_nsde_digits_cli_runs_and_reports_the_target(tmp_path):
    assert EXPERIMENTS["nsde-digits"] == "nsde_digits"
    assert main(["experiments", "nsde-digits", "--epochs", "1", "--seeds", "1", "--batch-size", "512",
                 "--methods", "vanilla,local-unbiased", "--tol", "0.5", "--test-trajectories", "2",
                 "--out", str(tmp_path)]) == 0
    results = _finite_summary(tmp_path, ("train_accuracy", "test_accuracy", "test_nfe", "train_time_s"))
    assert set(results["targets"]) == {"local-unbiased"}
    assert "Target (test NFE <= 0.8x vanilla" in (tmp_path / "results.md").read_text()
