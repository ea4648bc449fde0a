"""Tiny CLI runs of the time-series experiments (--quick): the result files exist and hold finite numbers."""

import json
import math

from pylux.experiments import EXPERIMENTS, main


def _summary(path, keys):
    results = json.loads((path / "results.json").read_text())
    assert (path / "results.md").exists() and (path / "training.png").exists()
    for method, stats in results["summary"].items():
        for key in keys:
            mean, std = stats[key]
            assert math.isfinite(mean) and math.isfinite(std), (method, key)
    return results


def test_latent_ode_periodic_quick(tmp_path):
    assert EXPERIMENTS["latent-ode-periodic"] == "latent_ode_periodic"
    assert main(["experiments", "latent-ode-periodic", "--quick", "--methods", "vanilla,steer,ernode,local-biased",
                 "--out", str(tmp_path)]) == 0
    results = _summary(tmp_path, ("test_mse", "test_nfe", "train_time_s", "predict_time_s"))
    assert list(results["summary"]) == ["vanilla", "steer", "ernode", "local-biased"]
    assert all(run["test_nfe"] > 0 for runs in results["runs"].values() for run in runs)
    assert {r["method"] for r in results["paper"]} == {"ernode", "local-biased"}
    assert (tmp_path / "fits.png").exists()
    assert "pylux experiments latent-ode-periodic --epochs 2 --seeds 1" in (tmp_path / "results.md").read_text()


def test_ncde_characters_quick(tmp_path):
    assert EXPERIMENTS["ncde-characters"] == "ncde_characters"
    assert main(["experiments", "ncde-characters", "--quick", "--methods", "seminorm,direct,reversible",
                 "--out", str(tmp_path)]) == 0
    results = _summary(tmp_path, ("test_accuracy", "forward_nfe", "backward_nfe", "saved_bytes"))
    runs = {m: r[0] for m, r in results["runs"].items()}
    # backprop keeps every step's tensors; the reversible backward pass keeps O(1) of them
    assert runs["reversible"]["saved_bytes"] < runs["direct"]["saved_bytes"]
    assert all(r["backward_nfe"] > 0 for r in runs.values())
    assert [r["method"] for r in results["paper"]] == ["reversible"]
