"""pylux.core: the layer protocol, setup, parameter trees, flat parameter vectors, random keys, and the
process-wide CPU memory setting solver loops want (:func:`retain_freed_cpu_memory`).

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
from .memory import retain_freed_cpu_memory
from .random import KEY_BOUND, check_key, draw_key, key_generator, split_key
from .tree import (
    TreeStructureError,
    tree_check_structure,
    tree_children,
    tree_global_norm,
    tree_leaves,
    tree_leaves_with_path,
    tree_map,
    tree_map_with_path,
    tree_rebuild_node,
    tree_replace_at_paths,
    tree_to,
    tree_zeros_like,
)

__all__ = [
    "AbstractContainerLayer", "AbstractLayer", "KEY_BOUND", "LayerError", "TreeStructureError", "Unflatten",
    "apply", "check_generator", "check_key", "draw_key", "flatten", "key_generator", "parameter_count",
    "retain_freed_cpu_memory", "setup", "split_key", "state_count", "testmode", "trainmode", "tree_check_structure",
    "tree_children",
    "tree_global_norm", "tree_leaves", "tree_leaves_with_path", "tree_map", "tree_map_with_path",
    "tree_rebuild_node", "tree_replace_at_paths", "tree_to", "tree_zeros_like",
]
