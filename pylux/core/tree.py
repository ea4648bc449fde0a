"""Parameter and state trees: nested ``dict``s (and lists, tuples, named tuples) of tensors.

Every pylux layer keeps its parameters and state outside itself, as a tree.
These helpers are the small vocabulary used to transform such trees, in the
spirit of ``jax.tree_util`` / ``Functors.fmap`` in Lux.jl. Leaves are tensors;
any other leaf (``bool``, ``int``, ``None``, strings) is passed through
unchanged by the mapping functions so that state flags such as
``st["training"]`` survive every transformation.

Every rebuild of a tree goes through one walker, :func:`tree_map_with_path`,
which knows the containers (:func:`tree_children`) and how to rebuild each
(:func:`tree_rebuild_node`: a named tuple such as a DEQ layer's
``DEQSolution`` is rebuilt field by field, ``type(x)(*fields)``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch

Tree = Any

__all__ = [
    "tree_map",
    "tree_map_with_path",
    "tree_replace_at_paths",
    "tree_children",
    "tree_rebuild_node",
    "tree_leaves",
    "tree_leaves_with_path",
    "tree_zeros_like",
    "tree_to",
    "tree_global_norm",
    "tree_check_structure",
    "TreeStructureError",
]


class TreeStructureError(ValueError):
    """Two trees that must have the same keys and shapes do not."""


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def tree_children(node: Any) -> list[tuple[Any, Any]] | None:
    """``(key, child)`` pairs of a container node, or ``None`` for a leaf.

    Containers are ``dict`` (keys in insertion order), ``list`` and ``tuple``
    (including named tuples; keys are positions). Everything else, tensors and
    non-tensors alike, is a leaf.
    """
    if isinstance(node, dict):
        return list(node.items())
    if isinstance(node, (list, tuple)):
        return list(enumerate(node))
    return None


def tree_rebuild_node(node: Any, values: list) -> Any:
    """A container of ``node``'s kind holding ``values`` (its children's replacements, in order).

    A ``dict`` (any mapping subclass included) becomes a plain ``dict`` with the
    same keys, a named tuple ``type(node)(*values)``, any other tuple or list
    ``type(node)(values)``.
    """
    if isinstance(node, dict):
        return dict(zip(node.keys(), values))
    if _is_namedtuple(node):
        return type(node)(*values)
    return type(node)(values)


def tree_map_with_path(fn: Callable[..., Any], tree: Tree, *rest: Tree,
                       is_leaf: Callable[[tuple, Any], bool] | None = None, where: str = "tree_map") -> Tree:
    """The one tree walker: rebuild ``tree`` with ``fn(path, leaf, *rest_leaves)`` at every leaf.

    Every function of pylux that rebuilds a tree goes through this walker, so
    dicts, lists, tuples and named tuples are rebuilt the same way everywhere
    (:func:`tree_rebuild_node`). A leaf is any value that is not a container,
    tensor or not (``None``, ``bool``, ``int``, strings, enums): ``fn`` decides
    what to do with it. ``is_leaf(path, node)`` may stop the walk at a
    container (its result replaces the whole subtree).

    Args:
        fn: ``fn(path, leaf, *rest_leaves) -> new leaf``; ``path`` is the tuple of
            keys (dict keys, sequence positions) from the root.
        tree: the tree whose structure the result has.
        rest: trees containing every path of ``tree``; their values at each leaf
            path are passed to ``fn``.
        is_leaf: optional predicate that treats a node as a leaf.
        where: the caller's name for error messages.

    Raises:
        TreeStructureError: a tree of ``rest`` lacks a key of ``tree``, or has a
            sequence of another length or type (the message names the path).
    """
    return _rebuild(fn, tree, rest, (), is_leaf, where)


def _rebuild(fn, tree, rest, path, is_leaf, where):
    children = None if is_leaf is not None and is_leaf(path, tree) else tree_children(tree)
    if children is None:
        return fn(path, tree, *rest)
    if isinstance(tree, dict):
        for r in rest:
            for k, _ in children:
                if not isinstance(r, dict) or k not in r:
                    raise TreeStructureError(f"{where}: key {_fmt_path(path + (k,))!r} is missing from one of "
                                             "the trees")
    else:
        for r in rest:
            if not isinstance(r, (list, tuple)) or len(r) != len(tree):
                raise TreeStructureError(
                    f"{where}: sequence at {_fmt_path(path)!r} has length {len(tree)} in the first tree "
                    "but a different length or type in another")
    values = [_rebuild(fn, child, tuple(r[k] for r in rest), path + (k,), is_leaf, where)
              for k, child in children]
    return tree_rebuild_node(tree, values)


def tree_map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` to every tensor leaf of ``tree`` (and matching leaves of ``rest``).

    ``tree_map(f, a, b)`` returns a tree of the structure of ``a`` whose leaf at
    path ``k`` is ``f(a[k], b[k])``. Non-tensor leaves of ``tree`` are returned
    unchanged. The trees in ``rest`` must contain every path of ``tree``; a
    missing key raises :class:`TreeStructureError` naming it.
    """
    def leaf(path, x, *others):
        return fn(x, *others) if isinstance(x, torch.Tensor) else x
    return tree_map_with_path(leaf, tree, *rest)


def tree_replace_at_paths(tree: Tree, paths: Sequence[tuple], new_leaves: Sequence[Any]) -> Tree:
    """A copy of ``tree`` with the node at each of ``paths`` replaced by the matching entry of ``new_leaves``.

    Paths are tuples of keys as :func:`tree_leaves_with_path` returns them; a
    path may also name a whole subtree. Nothing else is copied beyond the
    containers on the way (leaves are shared with ``tree``).

    Raises:
        ValueError: ``paths`` and ``new_leaves`` differ in length.
        TreeStructureError: a path that is not in ``tree`` (named).
    """
    paths = [tuple(p) for p in paths]
    new_leaves = list(new_leaves)
    if len(paths) != len(new_leaves):
        raise ValueError(f"tree_replace_at_paths: {len(paths)} paths but {len(new_leaves)} new leaves")
    mapping = dict(zip(paths, new_leaves))
    found: set = set()

    def replace(path, x):
        if path in mapping:
            found.add(path)
            return mapping[path]
        return x

    out = tree_map_with_path(replace, tree, is_leaf=lambda path, _: path in mapping, where="tree_replace_at_paths")
    missing = [p for p in mapping if p not in found]
    if missing:
        raise TreeStructureError(f"tree_replace_at_paths: no node at path {_fmt_path(missing[0])!r}")
    return out


def tree_leaves(tree: Tree) -> list[torch.Tensor]:
    """Tensor leaves of ``tree`` in a deterministic depth-first order (dict insertion order)."""
    return [leaf for _, leaf in tree_leaves_with_path(tree)]


def tree_leaves_with_path(tree: Tree, prefix: tuple = ()) -> list[tuple[tuple, torch.Tensor]]:
    """``(path, leaf)`` pairs for every tensor leaf, paths as tuples of keys."""
    out: list[tuple[tuple, torch.Tensor]] = []
    for path, leaf in _walk(tree, prefix):
        out.append((path, leaf))
    return out


def _walk(tree, path) -> Iterator[tuple[tuple, torch.Tensor]]:
    children = tree_children(tree)
    if children is not None:
        for k, v in children:
            yield from _walk(v, path + (k,))
    elif isinstance(tree, torch.Tensor):
        yield path, tree


def _fmt_path(path: tuple) -> str:
    return ".".join(str(p) for p in path) if path else "<root>"


def tree_zeros_like(tree: Tree) -> Tree:
    """A tree of the same structure with every tensor leaf replaced by zeros."""
    return tree_map(torch.zeros_like, tree)


def tree_to(tree: Tree, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
            non_blocking: bool = False) -> Tree:
    """Move every tensor leaf to ``device`` and cast floating leaves to ``dtype``.

    Integer and boolean leaves keep their dtype (a step counter must stay an
    integer when the parameters go to float64).
    """

    def move(x: torch.Tensor) -> torch.Tensor:
        target_dtype = dtype if (dtype is not None and (x.is_floating_point() or x.is_complex())) else x.dtype
        return x.to(device=device if device is not None else x.device, dtype=target_dtype,
                    non_blocking=non_blocking)

    return tree_map(move, tree)


def tree_global_norm(tree: Tree, ord: float = 2.0) -> torch.Tensor:
    r"""Global norm of all leaves, :math:`(\sum_i \|x_i\|_p^p)^{1/p}`, as a 0-d tensor.

    Computed with one fused ``torch._foreach_norm`` call where available, so
    there is no host synchronisation.
    """
    leaves = [x for x in tree_leaves(tree) if x.is_floating_point() or x.is_complex()]
    if not leaves:
        return torch.tensor(0.0)
    norms = torch._foreach_norm(leaves, ord)
    return torch.linalg.vector_norm(torch.stack([n.to(leaves[0].device) for n in norms]), ord)


def tree_check_structure(reference: Tree, candidate: Tree, name: str = "tree",
                         check_shapes: bool = True) -> None:
    """Raise :class:`TreeStructureError` if ``candidate`` does not match ``reference``.

    The message names the first missing key, extra key or shape mismatch, with
    its full path, e.g. ``"ps: missing key 'layer_2.weight'"``.
    """
    _check(reference, candidate, name, (), check_shapes)


def _check(ref, cand, name, path, check_shapes):
    if isinstance(ref, dict):
        if not isinstance(cand, dict):
            raise TreeStructureError(
                f"{name}: expected a dict at {_fmt_path(path)!r}, got {type(cand).__name__}")
        missing = [k for k in ref if k not in cand]
        extra = [k for k in cand if k not in ref]
        if missing:
            raise TreeStructureError(f"{name}: missing key {_fmt_path(path + (missing[0],))!r}")
        if extra:
            raise TreeStructureError(
                f"{name}: unexpected extra key {_fmt_path(path + (extra[0],))!r}")
        for k in ref:
            _check(ref[k], cand[k], name, path + (k,), check_shapes)
    elif isinstance(ref, (list, tuple)):
        if not isinstance(cand, (list, tuple)) or len(cand) != len(ref):
            raise TreeStructureError(f"{name}: sequence mismatch at {_fmt_path(path)!r}")
        for i, (r, c) in enumerate(zip(ref, cand)):
            _check(r, c, name, path + (i,), check_shapes)
    elif isinstance(ref, torch.Tensor):
        if not isinstance(cand, torch.Tensor):
            raise TreeStructureError(
                f"{name}: expected a tensor at {_fmt_path(path)!r}, got {type(cand).__name__}")
        if check_shapes and ref.shape != cand.shape:
            raise TreeStructureError(
                f"{name}: shape mismatch at {_fmt_path(path)!r}: expected {tuple(ref.shape)}, "
                f"got {tuple(cand.shape)}")
