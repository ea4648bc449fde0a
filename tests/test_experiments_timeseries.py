"""Tiny CLI runs of the time-series experiments (--quick): the result files exist and hold finite numbers."""

import json
import math

import pytest

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
    # --quick fits 16 series and holds 4 out for validation, scored like the test set
    assert results["settings"]["train"] - results["settings"]["val"] == 16
    assert all(run["val_nfe"] > 0 and math.isfinite(run["val_mse"])
               for runs in results["runs"].values() for run in runs)
    assert all(len(h["reg"]) == 2 * 2 for h in results["histories"]["vanilla"])  # 2 epochs of 16 // 8 steps
    assert all(r == 0.0 for r in results["histories"]["vanilla"][0]["reg"])
    assert all(r > 0.0 for r in results["histories"]["ernode"][0]["reg"])


def test_latent_ode_periodic_schedules():
    from types import SimpleNamespace

    from pylux.experiments.latent_ode_periodic import _schedules
    from pylux.training import CosineAnneal
    args = SimpleNamespace(lr=1e-2, lr_end=1e-4, weight_er=100.0, weight_sr=1.0, weight_local=1e4, weight_taylor=1.0,
                           weight_end=0.1, weight_delay=0)
    lr, weight = _schedules("ernode", args, 1000)
    assert isinstance(lr, CosineAnneal) and lr(0) == 1e-2 and abs(lr(1000) - 1e-4) < 1e-15
    assert weight(0) == 100.0 and abs(weight(500) - 100.0 * 0.1 ** 0.5) < 1e-9 and abs(weight(1000) - 10.0) < 1e-12
    args.lr_end, args.weight_end = None, 1.0
    lr, weight = _schedules("ernode", args, 1000)
    assert lr == 1e-2 and weight(0) == weight(999) == 100.0
    assert _schedules("vanilla", args, 1000)[1](5) == 0.0
    args.weight_delay, args.weight_end = 200, 0.1  # off for 200 steps, then 100 -> 10 over the remaining 800
    weight = _schedules("ernode", args, 1000)[1]
    assert weight(0) == weight(199) == 0.0 and weight(200) == 100.0
    assert abs(weight(600) - 100.0 * 0.1 ** 0.5) < 1e-9 and abs(weight(1000) - 10.0) < 1e-12


@pytest.mark.parametrize("flags, message", [(["--val", "16"], "--val must be in"),
                                            (["--val", "-1"], "--val must be in"),
                                            (["--batch-size", "30"], "--batch-size must be in"),
                                            (["--first-seed", "-1"], "--first-seed must be"),
                                            (["--units", "0"], "--units must be"),
                                            (["--weight-delay", "-1"], "--weight-delay must be")])
def test_latent_ode_periodic_bad_split(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        main(["experiments", "latent-ode-periodic", "--train", "16", "--val", "4", "--test", "4", "--epochs", "1",
              "--seeds", "1", "--methods", "vanilla", "--out", str(tmp_path), *flags])


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
