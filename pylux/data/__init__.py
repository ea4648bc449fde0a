"""pylux.data: data sets that need no download, local MNIST, and a fast in-memory loader.

Embedded: scikit-learn's 8x8 digits (:func:`load_digits`). Generated:
:func:`spirals`, :func:`two_moons`, the cubic spiral ODE trajectory
(:func:`spiral_ode_data`), Chandrasekhar's white dwarf (:func:`white_dwarf_data`); for density estimation
:func:`eight_gaussians`, :func:`checkerboard`, :func:`pinwheel`, :func:`dequantized_digits`, and
MINIBOONE from a local file (:func:`miniboone`). From local files: :func:`load_mnist`.
"""

from .digits import DIGITS_CLASSES, DIGITS_SHAPE, load_digits
from .loader import ArrayLoader
from .mnist import MNIST_FILES, load_mnist, read_idx
from .density import (DIGITS_LEVELS, MINIBOONE_DIMS, bits_per_dim, checkerboard, dequantized_digits, eight_gaussians,
                      miniboone, pinwheel)
from .synthetic import SPIRAL_ODE_MATRIX, spiral_ode_data, spirals, two_moons, white_dwarf_data
from .timeseries import PHYSIONET_PARAMETERS, character_trajectories, periodic_series, physionet

__all__ = [
    "ArrayLoader", "DIGITS_CLASSES", "DIGITS_SHAPE", "MNIST_FILES", "SPIRAL_ODE_MATRIX", "load_digits",
    "load_mnist", "read_idx", "spiral_ode_data", "spirals", "two_moons", "white_dwarf_data",
]
__all__ += ["eight_gaussians", "checkerboard", "pinwheel", "dequantized_digits", "bits_per_dim", "miniboone",
            "DIGITS_LEVELS", "MINIBOONE_DIMS"]
__all__ += ["PHYSIONET_PARAMETERS", "character_trajectories", "periodic_series", "physionet"]
