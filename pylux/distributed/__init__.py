"""pylux.distributed: data-parallel training on torch.distributed (one all-reduce of the flat gradient per step).

See :mod:`pylux.distributed.data_parallel` for the scheme, the backends (gloo on CPU, NCCL on
CUDA) and launching with ``torchrun``; ``examples/distributed_train.py`` is a complete script.
"""

from .data_parallel import (DistributedLoader, DistributedOptimizer, DistributedTrainState, initialize,
                            rank, reduce_statistics, synchronize, world_size)

__all__ = ["DistributedLoader", "DistributedOptimizer", "DistributedTrainState", "initialize", "rank",
           "reduce_statistics", "synchronize", "world_size"]
