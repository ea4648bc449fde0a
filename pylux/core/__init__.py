"""pylux.core: the layer protocol, setup, parameter trees and flat parameter vectors.

This package depends on torch only; every other pylux package builds on it.
"""

from .flat import Unflatten, flatten
from .layer import (
    AbstractContainerLayer,
    AbstractLayer,
    LayerError,
    apply,
    check_generator,
    parameter_count,
    setup,
    state_count,
    testmode,
    trainmode,
)
from .tree import (
    TreeStructureError,
    tree_check_structure,
    tree_global_norm,
    tree_leaves,
    tree_leaves_with_path,
    tree_map,
    tree_to,
    tree_zeros_like,
)

__all__ = [
    "AbstractContainerLayer", "AbstractLayer", "LayerError", "TreeStructureError", "Unflatten",
    "apply", "check_generator", "flatten", "parameter_count", "setup", "state_count", "testmode",
    "trainmode", "tree_check_structure", "tree_global_norm", "tree_leaves", "tree_leaves_with_path",
    "tree_map", "tree_to", "tree_zeros_like",
]
