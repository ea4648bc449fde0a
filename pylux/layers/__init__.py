"""pylux.layers: implicit layers built from the solvers (so far :class:`NeuralODE`)."""

from .neural_ode import NeuralODE

__all__ = ["NeuralODE"]
