"""Tiny CLI runs of the neural-SDE experiments: the summary files exist and hold finite numbers."""

import json
import math

import pytest

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
    # the shared grammar's outputs: the paper's claim beside ours, data loss and regularization apart, plots
    assert {c["method"] for c in results["paper_comparison"]} == {"ernsde", "srnsde", "local-unbiased",
                                                                   "local-biased"}
    history = results["histories"]["ernsde"][0]
    assert len(history["data_loss"]) == len(history["reg"]) == 2 and history["reg"][0] > 0
    assert results["histories"]["vanilla"][0]["reg"] == [0.0, 0.0]
    assert len(results["fits"]["vanilla"][0]) == 30
    assert (tmp_path / "training.png").exists() and (tmp_path / "fit.png").exists()


def test_nsde_digits_cli_runs_and_reports_the_target(tmp_path):
    assert EXPERIMENTS["nsde-digits"] == "nsde_digits"
    assert main(["experiments", "nsde-digits", "--epochs", "1", "--seeds", "1", "--batch-size", "512",
                 "--methods", "vanilla,local-unbiased", "--tol", "0.5", "--test-trajectories", "2",
                 "--out", str(tmp_path)]) == 0
    results = _finite_summary(tmp_path, ("train_accuracy", "test_accuracy", "test_nfe", "train_time_s"))
    assert set(results["targets"]) == {"local-unbiased"}
    text = (tmp_path / "results.md").read_text()
    assert "Target (test NFE <= 0.8x vanilla" in text and "| local-unbiased | vanilla | test NFE (lower) | 0.73x" in text
    assert (tmp_path / "training.png").exists()


def test_sde_experiments_share_the_cli_grammar(tmp_path):
    for name in ("sde-spiral", "nsde-digits"):
        with pytest.raises(ValueError, match="unknown method.*'nope'"):
            main(["experiments", name, "--methods", "vanilla,nope", "--out", str(tmp_path)])
        with pytest.raises(ValueError, match="--seeds is the number of seeds"):
            main(["experiments", name, "--seeds", "0", "--out", str(tmp_path)])
