"""pylux.training: train states, optimizers over flat parameter vectors, schedules,
a training loop with progress bars and metric history, and checkpoints.

The vocabulary is Lux.jl's ``Training`` module::

    train_state = TrainState(model, ps, st, Adam(1e-3))
    grads, loss, stats, train_state = single_train_step(loss_fn, (x, y), train_state)
    # loss_fn(model, ps, st, data) -> (loss, st, stats)
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .fit import History, fit, progress_bar
from .losses import AbstractLoss, BinaryCrossEntropyLoss, CrossEntropyLoss, MSELoss
from .optimizers import AbstractOptimizer, AdaBelief, Adam, Adamax, AdamW, SGD
from .torch_optimizer import TorchOptimizer
from .schedules import AbstractSchedule, Constant, CosineAnneal, ExponentialAnneal, InverseDecay, Step
from .train_state import (
    StaleTrainStateError,
    TrainState,
    apply_gradients,
    compute_gradients,
    single_train_step,
)

__all__ = [
    "AbstractOptimizer", "AbstractSchedule", "AdaBelief", "Adam", "AdamW", "Adamax", "CheckpointError",
    "Constant", "CosineAnneal", "ExponentialAnneal", "History", "InverseDecay", "SGD", "StaleTrainStateError",
    "Step", "TrainState", "apply_gradients", "compute_gradients", "fit", "load_checkpoint", "progress_bar",
    "save_checkpoint", "single_train_step",
]
__all__ += ["TorchOptimizer"]
__all__ += ["AbstractLoss", "BinaryCrossEntropyLoss", "CrossEntropyLoss", "MSELoss"]
