"""Data-parallel training on ``torch.distributed``, after Lux.jl's ``DistributedUtils``.

Every rank holds the whole model and trains on its own shard of each batch. Per step:

1. each rank computes the gradient of its local loss (the mean over its shard);
2. **one** ``all_reduce`` sums the flat gradient vector (``TrainState`` keeps one vector,
   so this is one collective whatever the number of parameter tensors) and it is divided
   by the number of ranks;
3. every rank applies the same optimizer update to the same parameters, so parameters and
   optimizer state stay identical without further communication.

With shards of equal size the averaged gradient is the gradient of the mean loss over the
concatenated batch, so ``R`` ranks with batch ``B`` each train exactly as one process with
batch ``R·B`` (to round-off of the summation order).

Backends: ``gloo`` on CPU; ``nccl`` on CUDA, where each process first selects its GPU
(``torch.cuda.set_device(local_rank)``, done by :func:`initialize`) and the parameters,
batches and statistics live on it. Launch with ``torchrun --nproc_per_node N script.py``
(one process per GPU with NCCL); :func:`initialize` reads torchrun's environment.

Like ``DistributedDataParallel``, this never synchronises model *state* (BatchNorm running
statistics, RNG keys) during training: :func:`synchronize` broadcasts it on request.
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Mapping

import torch
import torch.distributed as dist

from ..core import flatten, tree_leaves_with_path, tree_map_with_path
from ..training import AbstractOptimizer, TrainState

__all__ = ["initialize", "rank", "world_size", "synchronize", "DistributedOptimizer", "DistributedTrainState",
           "DistributedLoader", "reduce_statistics"]


def _require_initialized(where: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{where}: torch.distributed is not initialized; call pylux.distributed.initialize() "
                           "(under torchrun) or torch.distributed.init_process_group(...) first")


def initialize(backend: str | None = None, **init_kwargs: Any) -> tuple[int, int]:
    """Start the default process group from torchrun's environment; returns ``(rank, world_size)``.

    ``backend`` defaults to ``"nccl"`` when CUDA is available and ``"gloo"`` otherwise. With
    NCCL the process's GPU is set to ``LOCAL_RANK``. Calling it again once initialized
    returns the current rank and size. ``init_kwargs`` go to ``init_process_group``
    (e.g. ``init_method="file:///tmp/init", rank=0, world_size=2`` outside torchrun).
    """
    if not dist.is_available():
        raise RuntimeError("initialize: this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, **init_kwargs)
    return dist.get_rank(), dist.get_world_size()


def rank(group: Any = None) -> int:
    """This process's rank (0 when torch.distributed is not initialized)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world_size(group: Any = None) -> int:
    """The number of ranks (1 when torch.distributed is not initialized)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def synchronize(obj: Any, *, src: int = 0, group: Any = None) -> Any:
    """Make ``obj`` on every rank equal to its value on rank ``src`` (Lux's ``synchronize!``).

    * a :class:`~pylux.training.TrainState`: its flat parameter vector and optimizer state are
      broadcast in place (one collective each), its model state ``st`` as a tree; returns a
      TrainState with the broadcast state;
    * a tree of tensors (``ps``, ``st``): flattened into one vector per dtype and broadcast;
      returns a new tree (non-tensor leaves are kept as they are on each rank);
    * a tensor: broadcast in place and returned.
    """
    _require_initialized("synchronize")
    if isinstance(obj, TrainState):
        dist.broadcast(obj.params, src, group=group)
        state = obj.opt_state
        tensors = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
        for key in tensors:
            value = state[key]
            buffer = value if value.is_contiguous() else value.contiguous()
            dist.broadcast(buffer, src, group=group)
            if buffer is not value:
                value.copy_(buffer)
        return obj.with_state(synchronize(obj.st, src=src, group=group))
    if isinstance(obj, torch.Tensor):
        dist.broadcast(obj, src, group=group)
        return obj
    pairs = tree_leaves_with_path(obj)
    if not pairs:
        return obj
    new: dict = {}
    for dtype in dict.fromkeys(leaf.dtype for _, leaf in pairs):
        group_pairs = [(path, leaf) for path, leaf in pairs if leaf.dtype == dtype]
        vector, unflatten = flatten({i: leaf for i, (_, leaf) in enumerate(group_pairs)})
        vector = vector.clone()
        dist.broadcast(vector, src, group=group)
        rebuilt = unflatten(vector)
        new.update({path: rebuilt[i].clone() for i, (path, _) in enumerate(group_pairs)})
    return tree_map_with_path(lambda path, x: new.get(path, x), obj, where="synchronize")


class DistributedOptimizer(AbstractOptimizer):
    r"""Wrap an optimizer so that each update first averages the flat gradient over the ranks.

    :math:`g \leftarrow \frac{1}{R}\sum_{r=1}^{R} g_r` by one ``all_reduce`` (sum, then a
    division: gloo has no average), then the wrapped optimizer's update. Lux's
    ``DistributedOptimizer``. The gradient returned by
    :func:`~pylux.training.single_train_step` is this averaged gradient.

    Args:
        optimizer: any pylux optimizer, or a ``torch.optim.Optimizer`` (wrapped in
            :class:`~pylux.training.TorchOptimizer`).
        group: the process group (default: the world).
    """

    def __init__(self, optimizer: Any, group: Any = None):
        if isinstance(optimizer, torch.optim.Optimizer):
            from ..training import TorchOptimizer
            optimizer = TorchOptimizer(optimizer)
        if not isinstance(optimizer, AbstractOptimizer):
            raise TypeError(f"DistributedOptimizer: expected a pylux or torch optimizer, got "
                            f"{type(optimizer).__name__}")
        if isinstance(optimizer, DistributedOptimizer):
            raise TypeError("DistributedOptimizer: the optimizer is already distributed; wrapping it twice would "
                            "average the gradient twice")
        self.optimizer = optimizer
        self.group = group

    @property
    def state_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.optimizer.state_names

    @property
    def lr(self):  # type: ignore[override]
        return self.optimizer.lr

    def learning_rate(self, step: int) -> float:
        return self.optimizer.learning_rate(step)

    def init(self, params: torch.Tensor) -> dict:
        return self.optimizer.init(params)

    def update(self, opt_state: Mapping[str, Any], grad: torch.Tensor, params: torch.Tensor, step: int, *,
               inplace: bool = False):
        _require_initialized("DistributedOptimizer.update")
        self._check_vector(grad, "grad")
        if not inplace:
            grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=self.group)
        grad.div_(dist.get_world_size(self.group))
        return self.optimizer.update(opt_state, grad, params, step, inplace=inplace)

    def _update_(self, state, grad, params, t, lr):  # pragma: no cover - update() delegates
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "world_size": world_size(self.group)}

    def __repr__(self) -> str:
        return f"DistributedOptimizer({self.optimizer!r})"


class DistributedTrainState(TrainState):
    """A :class:`~pylux.training.TrainState` whose ranks start equal and stay equal.

    Builds the TrainState with the optimizer wrapped in :class:`DistributedOptimizer` and
    broadcasts parameters, optimizer state and model state from rank ``src``, so ranks that
    initialised differently start from one model. Train it with the ordinary
    :func:`~pylux.training.single_train_step` or :func:`~pylux.training.fit`; the states
    they return are plain TrainStates carrying the distributed optimizer.

    Args:
        model, ps, st: as for TrainState.
        optimizer: a pylux optimizer or a ``torch.optim.Optimizer``.
        src: the rank whose values are broadcast.
        group: the process group (default: the world).

    Raises:
        RuntimeError: torch.distributed is not initialized.
    """

    __slots__ = ()

    def __init__(self, model: Any, ps: Any, st: Any, optimizer: Any, *, src: int = 0, group: Any = None):
        _require_initialized("DistributedTrainState")
        distributed = optimizer if isinstance(optimizer, DistributedOptimizer) else \
            DistributedOptimizer(optimizer, group)
        super().__init__(model, ps, st, distributed)
        synced = synchronize(self, src=src, group=group)
        self.st = synced.st


class DistributedLoader:
    """Batches of this rank's shard of ``dataset``, a new shuffle each epoch.

    A ``torch.utils.data.DataLoader`` over a ``DistributedSampler``: the ranks see disjoint
    shards of equal size (padded by repetition unless ``drop_last``), and each ``iter()``
    advances the sampler's epoch so the shuffle changes from epoch to epoch while staying
    the same on every rank. ``batch_size`` is per rank.

    Args:
        dataset: a map-style dataset (e.g. ``TensorDataset(x, y)``).
        batch_size: samples per batch on each rank.
        shuffle, seed, drop_last: as for ``DistributedSampler``.
        group: the process group (default: the world).
        **loader_kwargs: passed to ``DataLoader`` (``num_workers``, ``pin_memory``, ...).
    """

    def __init__(self, dataset: Any, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, group: Any = None, **loader_kwargs: Any):
        from torch.utils.data import DataLoader, DistributedSampler
        _require_initialized("DistributedLoader")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"DistributedLoader: batch_size must be a positive int, got {batch_size!r}")
        for name in ("sampler", "shuffle", "batch_sampler"):
            if name in loader_kwargs:
                raise TypeError(f"DistributedLoader: {name}= is chosen by the loader (a DistributedSampler); "
                                "drop it")
        self.sampler = DistributedSampler(dataset, num_replicas=world_size(group), rank=rank(group),
                                          shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, **loader_kwargs)
        self.epoch = 0

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def _is_number(x: Any) -> bool:
    return (isinstance(x, numbers.Real) and not isinstance(x, bool)) or (
        isinstance(x, torch.Tensor) and x.numel() == 1 and x.dtype != torch.bool)


def reduce_statistics(stats: Any, op: str = "mean", *, group: Any = None, device: Any = None) -> Any:
    """Reduce every numeric leaf of ``stats`` (ints, floats, one-element tensors) across the ranks.

    Solver counters differ between ranks (an adaptive solve of another shard takes other
    steps): ``reduce_statistics(st, "mean")`` gives e.g. the mean NFE per rank,
    ``"sum"`` the total, ``"max"``/``"min"`` the extremes. All leaves travel in one float64
    ``all_reduce``. Non-numeric leaves (flags, dicts of other things) are returned unchanged;
    Python numbers come back as floats, tensors as tensors of their dtype (rounded for
    integer tensors under ``"mean"``).

    Args:
        stats: a tree (e.g. the ``stats`` returned by a train step, or a NeuralODE's ``st``).
        op: ``"mean"``, ``"sum"``, ``"max"`` or ``"min"``.
        group: the process group.
        device: where the reduction runs; default the GPU of this rank under NCCL, else CPU.
    """
    _require_initialized("reduce_statistics")
    ops = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
           "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"reduce_statistics: op must be one of {sorted(ops)}, got {op!r}")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
            else torch.device("cpu")
    paths, values = [], []

    def collect(path, x):
        if _is_number(x):
            paths.append(path)
            values.append(x.detach().reshape(()).to(device, torch.float64) if isinstance(x, torch.Tensor)
                          else torch.tensor(float(x), dtype=torch.float64, device=device))
        return x

    tree_map_with_path(collect, stats, where="reduce_statistics")
    if not values:
        return stats
    packed = torch.stack(values)
    dist.all_reduce(packed, op=ops[op], group=group)
    if op == "mean":
        packed /= dist.get_world_size(group)
    reduced = dict(zip(paths, packed.cpu().tolist()))

    def rebuild(path, x):
        if path not in reduced:
            return x
        value = reduced[path]
        if isinstance(x, torch.Tensor):
            return torch.tensor(round(value) if not x.is_floating_point() else value, dtype=x.dtype,
                                device=x.device).reshape(x.shape)
        return value

    return tree_map_with_path(rebuild, stats, where="reduce_statistics")
