"""A training loop with a progress bar and a metric history.

:func:`fit` runs :func:`single_train_step` over a data loader for a number of
epochs. Losses and statistics stay on the device while the loop runs; they are
brought to the host in one batch every ``log_every`` steps and at the end of
each epoch — the only host synchronisations the loop adds.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from .train_state import LossFn, TrainState, single_train_step

__all__ = ["fit", "History", "progress_bar"]


def progress_bar(**kwargs):
    """A tqdm progress bar: a widget in a Jupyter kernel that has ipywidgets, a text bar everywhere else.

    The choice ``tqdm.auto`` makes, without its warnings: importing ``tqdm.auto`` in
    a kernel without ipywidgets warns "IProgress not found", so a library that
    imported it at module level would warn whenever it is imported in Jupyter.
    Install the ``notebook`` extra (ipywidgets) for widget bars. ``kwargs`` go to tqdm.
    """
    if "ipykernel.zmqshell" in sys.modules and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm as bar  # noqa: PLC0415
    else:
        from tqdm.std import tqdm as bar  # noqa: PLC0415
    return bar(**kwargs)


class History(list):
    """The per-step records of :func:`fit`: a list of dicts, plus per-epoch records.

    Each step record has ``step`` (the TrainState's step after the update),
    ``epoch`` (1-based), ``loss`` and every statistic ``loss_fn`` returned (nested
    dicts flattened to dotted keys, 0-d tensors as Python numbers).
    ``history.epochs`` holds one dict per epoch: ``epoch``, ``step``, ``loss`` (the
    epoch's mean), ``time`` (seconds since the start of ``fit``) and the values of
    the ``metrics``.
    """

    def __init__(self, records: Iterable[dict] = ()):
        super().__init__(records)
        self.epochs: list[dict] = []

    def column(self, key: str, *, per_epoch: bool = False) -> list:
        """The values of ``key`` in order (``None`` where a record lacks it)."""
        return [record.get(key) for record in (self.epochs if per_epoch else self)]

    def keys(self) -> list[str]:
        """Every key that some step record has, in order of first appearance."""
        return list(dict.fromkeys(key for record in self for key in record))

    def __repr__(self) -> str:
        # A summary, not the records: a list repr of 3000 steps runs to ~90 000
        # characters and floods a notebook cell. ``list(history)`` shows them all.
        parts = [f"{len(self)} steps", f"{len(self.epochs)} epochs"]
        if self:
            last = self[-1]
            shown = ", ".join(f"{key}={_short(last[key])}" for key in self.keys()
                              if key not in ("step", "epoch") and isinstance(last.get(key), numbers.Number))
            if shown:
                parts.append(f"last step: {shown}")
        if self.epochs:
            last_epoch = self.epochs[-1]
            shown = ", ".join(f"{key}={_short(value)}" for key, value in last_epoch.items()
                              if key not in ("epoch", "step") and isinstance(value, numbers.Number))
            parts.append(f"last epoch: {shown}")
        return f"History({'; '.join(parts)})"

    __str__ = __repr__

    def plot(self, path: str | None = None, keys: Sequence[str] = ("loss", "nfe"), *, title: str | None = None):
        """One panel per key of the step records against the training step (matplotlib).

        Args:
            path: write the figure there as an image (PNG for ``*.png``) and close it;
                ``None`` returns the open figure (in a notebook it is drawn inline).
            keys: record keys to plot; keys no record has are left out. ``"loss"``
                is drawn on a log scale when it stays positive.
            title: the figure's title.

        Returns:
            ``path`` when a file was written, else the matplotlib figure.

        Raises:
            ImportError: matplotlib is not installed (``pip install matplotlib``).
            ValueError: none of ``keys`` is in the records.
        """
        present = [key for key in keys if any(key in record for record in self)]
        if not present:
            raise ValueError(f"History.plot: none of {list(keys)} is in the records; recorded keys: {self.keys()}")
        size = (5 * len(present), 3.6)
        if path is None:  # pyplot's figure, so that Jupyter draws it inline
            import matplotlib.pyplot as plt  # noqa: PLC0415 (matplotlib is imported only when plotting)
            fig = plt.figure(figsize=size)
        else:  # a bare Figure: no GUI backend needed, and pyplot's backend (inline in Jupyter) is left alone
            from matplotlib.figure import Figure  # noqa: PLC0415
            fig = Figure(figsize=size)
        axes = fig.subplots(1, len(present), squeeze=False)
        steps = self.column("step")
        for ax, key in zip(axes[0], present):
            pairs = [(s, v) for s, v in zip(steps, self.column(key)) if isinstance(v, numbers.Number)]
            ax.plot([s for s, _ in pairs], [v for _, v in pairs], lw=1)
            ax.set(xlabel="training step", ylabel=key)
            if key == "loss" and pairs and min(v for _, v in pairs) > 0:
                ax.set_yscale("log")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        if path is None:
            return fig
        fig.savefig(path, dpi=120)
        return path


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


_RESERVED = ("step", "epoch", "loss")


def _flatten_stats(stats: Any, prefix: str, out: dict) -> None:
    if isinstance(stats, Mapping):
        for key, value in stats.items():
            name = f"{prefix}{key}"
            if name in _RESERVED:
                name = f"stats.{name}"
            if isinstance(value, Mapping):
                _flatten_stats(value, name + ".", out)
            else:
                out[name] = value
    elif stats is not None:
        out[prefix.rstrip(".") or "stats"] = stats


class _PendingRecords:
    """Step records whose tensors have not been brought to the host yet."""

    def __init__(self):
        self.records: list[dict] = []

    def add(self, record: dict) -> None:
        self.records.append(record)

    def flush(self) -> list[dict]:
        """Convert every 0-d tensor of the pending records to a Python number in one transfer."""
        records, self.records = self.records, []
        slots = [(record, key) for record in records for key, value in record.items()
                 if isinstance(value, torch.Tensor) and value.numel() == 1]
        if slots:
            by_device: dict[torch.device, list] = {}
            for slot in slots:
                by_device.setdefault(slot[0][slot[1]].device, []).append(slot)
            for group in by_device.values():
                tensors = [record[key] for record, key in group]
                values = torch.stack([t.detach().reshape(()).to(torch.float64) for t in tensors]).tolist()
                for (record, key), tensor, value in zip(group, tensors, values):
                    is_integer = not (tensor.is_floating_point() or tensor.is_complex())
                    record[key] = int(value) if is_integer and math.isfinite(value) else value
        return records


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"fit: {name} must be a positive integer, got {value!r}")
    return int(value)


def fit(loss_fn: LossFn, train_state: TrainState, data_loader: Iterable, *, epochs: int,
        metrics: Mapping[str, Callable[[TrainState], Any]] | None = None,
        callbacks: Sequence[Callable[[TrainState, dict, "History"], Any]] = (),
        progress: bool = True, log_every: int = 50, stop_on_nonfinite: bool = True,
        description: str = "fit") -> tuple[TrainState, History]:
    """Train for ``epochs`` passes over ``data_loader`` with :func:`single_train_step`.

    Args:
        loss_fn: ``(model, ps, st, batch) -> (loss, st, stats)`` as in Lux; ``stats``
            (a dict, possibly nested, e.g. ``{"nfe": ...}``) is recorded every step.
        train_state: the starting :class:`TrainState` (it is advanced in place and
            becomes stale; use the returned one).
        data_loader: any re-iterable of batches: a :class:`pylux.data.ArrayLoader`, a
            ``torch.utils.data.DataLoader``, a list of batches. Batches are passed to
            ``loss_fn`` as they come; move them to the device beforehand or wrap the
            loader in :class:`pylux.interop.DeviceLoader`.
        epochs: number of passes.
        metrics: name -> ``fn(train_state)`` evaluated at the end of each epoch (e.g.
            test accuracy) and stored in ``history.epochs``.
        callbacks: ``fn(train_state, epoch_record, history)`` called at the end of each
            epoch; a truthy return value stops training.
        progress: show a tqdm progress bar (:func:`progress_bar`: a widget in Jupyter with ipywidgets).
        log_every: bring losses to the host and refresh the bar every this many steps.
        stop_on_nonfinite: raise ``FloatingPointError`` when a NaN/Inf loss is seen
            (checked when losses reach the host, so up to ``log_every`` steps late).
        description: the progress bar's label.

    Returns:
        ``(train_state, history)``: the final state and a :class:`History`.

    Raises:
        TypeError: ``data_loader`` is not iterable; ``loss_fn`` returns a bad structure.
        ValueError: non-positive ``epochs`` or ``log_every``.
        FloatingPointError: a non-finite loss with ``stop_on_nonfinite=True``.
    """
    epochs = _check_positive_int("epochs", epochs)
    log_every = _check_positive_int("log_every", log_every)
    if not isinstance(train_state, TrainState):
        raise TypeError(f"fit: train_state must be a TrainState, got {type(train_state).__name__}")
    if not hasattr(data_loader, "__iter__"):
        raise TypeError(f"fit: data_loader must be an iterable of batches, got {type(data_loader).__name__}")
    if hasattr(data_loader, "__next__"):  # an iterator; asking a DataLoader for iter() would start its workers
        raise TypeError("fit: data_loader is a one-shot iterator (a generator?) and would be empty after the "
                        "first epoch; pass a re-iterable loader such as pylux.data.ArrayLoader or a list")
    metrics = dict(metrics or {})
    for name, fn in metrics.items():
        if not callable(fn):
            raise TypeError(f"fit: metric {name!r} must be callable as fn(train_state), got {type(fn).__name__}")
    for fn in callbacks:
        if not callable(fn):
            raise TypeError(f"fit: callbacks must be callables, got {type(fn).__name__}")

    try:
        steps_per_epoch = len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = None
    bar = progress_bar(total=None if steps_per_epoch is None else epochs * steps_per_epoch, desc=description,
                       disable=not progress, unit="step", dynamic_ncols=True)
    history = History()
    pending = _PendingRecords()
    start = time.perf_counter()

    def flush(epoch: int) -> list[dict]:
        records = pending.flush()
        history.extend(records)
        if stop_on_nonfinite:
            for record in records:
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(
                        f"fit: the loss became {record['loss']} at step {record['step']} (epoch {record['epoch']}). "
                        "Lower the learning rate, check the data for NaN/Inf, or look at the solver statistics "
                        "in the history; pass stop_on_nonfinite=False to keep going.")
        if records and progress:
            last = records[-1]
            postfix = {"epoch": epoch, "loss": f"{last['loss']:.4g}"}
            postfix.update({k: v for k, v in last.items()
                            if k not in ("step", "epoch", "loss") and isinstance(v, (int, float))})
            bar.set_postfix(postfix, refresh=False)
        return records

    try:
        for epoch in range(1, epochs + 1):
            epoch_losses: list[float] = []
            steps_this_epoch = 0
            for batch in data_loader:
                _, loss, stats, train_state = single_train_step(loss_fn, batch, train_state)
                record: dict = {"step": train_state.step, "epoch": epoch, "loss": loss}
                _flatten_stats(stats, "", record)
                pending.add(record)
                steps_this_epoch += 1
                bar.update(1)
                if steps_this_epoch % log_every == 0:
                    epoch_losses += [r["loss"] for r in flush(epoch)]
            epoch_losses += [r["loss"] for r in flush(epoch)]
            if steps_this_epoch == 0:
                raise ValueError(f"fit: data_loader yielded no batches in epoch {epoch}")
            epoch_record = {"epoch": epoch, "step": train_state.step,
                            "loss": sum(epoch_losses) / len(epoch_losses),
                            "time": time.perf_counter() - start}
            for name, fn in metrics.items():
                value = fn(train_state)
                epoch_record[name] = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 \
                    else value
            history.epochs.append(epoch_record)
            if progress and metrics:
                bar.set_postfix({"epoch": epoch, "loss": f"{epoch_record['loss']:.4g}",
                                 **{k: (f"{v:.4g}" if isinstance(v, float) else v)
                                    for k, v in epoch_record.items() if k in metrics}}, refresh=True)
            if any([bool(fn(train_state, epoch_record, history)) for fn in callbacks]):
                break
    finally:
        bar.close()
    return train_state, history
