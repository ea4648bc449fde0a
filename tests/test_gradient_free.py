"""examples/gradient_free.py: black-box optimizers train a pylux model through its flat parameter vector."""

import pathlib
import runpy

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
EXAMPLE = runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "examples" / "gradient_free.py"),
                         run_name="gradient_free")


def test_the_objective_is_the_model_loss_of_the_unflattened_vector():
    objective = EXAMPLE["Objective"](seed=3)
    theta = objective.theta0.numpy().copy()
    ps = objective.unflatten(torch.as_tensor(theta))
    prediction, _ = objective.model(objective.features, ps, objective.st)
    expected = float((prediction[:, 0] - (1 + 0.3 * torch.cos(3 * objective.phi))).pow(2).mean())
    assert objective(theta) == pytest.approx(expected, rel=1e-12) and objective.evaluations == 1
    theta[0] += 0.5  # the loss reads the vector it is given, not the initial parameters
    assert objective(theta) != pytest.approx(expected, rel=1e-6)
    assert theta.size == 2 * 8 + 8 + 8 + 1 == objective.theta0.numel()


@pytest.mark.parametrize("method", ["Powell (scipy)", "COBYLA (scipy)", "CMA-ES (cma)"])
def test_gradient_free_methods_fit_the_curve_within_their_budget(method):
    if method.startswith("CMA"):
        pytest.importorskip("cma")
    (result,) = EXAMPLE["run"](400, methods=(method,)).values()
    assert result["initial_loss"] == pytest.approx(1.1831, abs=1e-3)  # seed 0's network, float64
    assert result["loss"] < result["initial_loss"] / 10
    assert result["evaluations"] <= 400 + 12  # CMA-ES stops after the generation that crosses the budget
    assert np.isfinite(result["theta"]).all()


def test_gradient_free_main_prints_the_table(capsys):
    EXAMPLE["main"](["--evaluations", "50"])
    out = capsys.readouterr().out
    assert "33-parameter network" in out and "Powell (scipy)" in out and "Adam (gradients)" in out
