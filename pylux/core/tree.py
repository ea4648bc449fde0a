"""Parameter and state trees: nested ``dict``s (and lists/tuples) of tensors.

Every pylux layer keeps its parameters and state outside itself, as a tree.
These helpers are the small vocabulary used to transform such trees, in the
spirit of ``jax.tree_util`` / ``Functors.fmap`` in Lux.jl. Leaves are tensors;
any other leaf (``bool``, ``int``, ``None``, strings) is passed through
unchanged by the mapping functions so that state flags such as
``st["training"]`` survive every transformation.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

Tree = Any

__all__ = [
    "tree_map",
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


def _is_container(x: Any) -> bool:
    return isinstance(x, (dict, list, tuple))


def tree_map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` to every tensor leaf of ``tree`` (and matching leaves of ``rest``).

    ``tree_map(f, a, b)`` returns a tree of the structure of ``a`` whose leaf at
    path ``k`` is ``f(a[k], b[k])``. Non-tensor leaves of ``tree`` are returned
    unchanged. The trees in ``rest`` must contain every path of ``tree``; a
    missing key raises :class:`TreeStructureError` naming it.
    """
    return _map(fn, tree, rest, ())


def _map(fn, tree, rest, path):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            sub = []
            for r in rest:
                if not isinstance(r, dict) or k not in r:
                    raise TreeStructureError(
                        f"tree_map: key {_fmt_path(path + (k,))!r} is missing from one of the trees"
                    )
                sub.append(r[k])
            out[k] = _map(fn, v, tuple(sub), path + (k,))
        return out
    if isinstance(tree, (list, tuple)):
        for r in rest:
            if not isinstance(r, (list, tuple)) or len(r) != len(tree):
                raise TreeStructureError(
                    f"tree_map: sequence at {_fmt_path(path)!r} has length {len(tree)} in the first tree "
                    "but a different length or type in another"
                )
        items = [_map(fn, v, tuple(r[i] for r in rest), path + (i,)) for i, v in enumerate(tree)]
        return type(tree)(items) if not hasattr(tree, "_fields") else type(tree)(*items)
    if isinstance(tree, torch.Tensor):
        return fn(tree, *rest)
    return tree


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
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _walk(v, path + (k,))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _walk(v, path + (i,))
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
