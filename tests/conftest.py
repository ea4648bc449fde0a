"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def float64_default():
    """float64 as torch's default dtype for one module's tests, restored afterwards (never leaked to others)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
