"""Misspelt keywords of the regularizers and of NeuralODE are refused by name, with the closest one."""

import pytest
import torch

import pylux as lx
from pylux import nn


@pytest.mark.parametrize("build, close", [
    (lambda: lx.ErrorEstimateRegularization(squard=True), "squared"),
    (lambda: lx.LocalErrorRegularization(samplng="biased"), "sampling"),
    (lambda: lx.LocalErrorRegularization(t_rg=0.5), "t_reg"),
    (lambda: lx.STEER(0.5, bb=0.1), "b"),
    (lambda: lx.JacobianFrobeniusRegularization(generatr=torch.Generator()), "generator"),
    (lambda: lx.TaylorRegularization(ordr=3), "order"),
    (lambda: lx.TaylorRegularization(2, strct=True), "strict"),
    (lambda: lx.NeuralODE(nn.Dense(2, 2), (0.0, 1.0), regularise=lx.STEER(0.5)), "regularize"),
    (lambda: lx.NeuralODE(nn.Dense(2, 2), (0.0, 1.0), time_inputs=True), "time_input"),
    (lambda: lx.NeuralODE(nn.Dense(2, 2), (0.0, 1.0), abstl=1e-6), "abstol"),
], ids=["ErrorEstimate", "Local.sampling", "Local.t_reg", "STEER", "JacobianFrobenius", "Taylor.order",
        "Taylor.strict", "NeuralODE.regularize", "NeuralODE.time_input", "NeuralODE.abstol"])
def test_misspelt_keyword_raises_type_error_naming_the_close_match(build, close):
    with pytest.raises(TypeError, match=rf"unknown keyword.*did you mean '{close}'"):
        build()


def test_correct_keywords_still_work():
    assert lx.ErrorEstimateRegularization(squared=True).squared
    assert lx.LocalErrorRegularization(sampling="unbiased", t_reg=0.5, dt=0.1).t_reg == 0.5
    assert lx.STEER(b=0.25).b == 0.25
    assert lx.TaylorRegularization(order=3, strict=True).order == 3
