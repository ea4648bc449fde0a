r"""Irregularly sampled time series: the periodic toy, synthetic pen trajectories, and PhysioNet 2012 from disk.

Generated sets draw everything from ``torch.Generator().manual_seed(seed)``:
the same seed gives the same data. Nothing is downloaded; :func:`physionet`
reads the challenge's text files from a local directory.
"""

from __future__ import annotations

import math
import os

import torch

__all__ = ["periodic_series", "character_trajectories", "physionet", "PHYSIONET_PARAMETERS", "STROKE_CLASSES"]


def _positive_int(where: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _fraction(where: str, name: str, value, *, allow_one: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value and (
        value <= 1.0 if allow_one else value < 1.0)
    if not ok:
        raise ValueError(f"{where}: {name} must be in [0, {1 if allow_one else '1)'}{']' if allow_one else ''}, "
                         f"got {value!r}")
    return float(value)


def periodic_series(n: int, *, n_times: int = 100, t_max: float = 5.0, observed: float = 0.5,
                    frequency: tuple[float, float] = (0.3, 0.7), components: int = 1, noise: float = 0.01,
                    seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    r"""Rubanova et al.'s (2019) irregularly sampled periodic toy.

    One grid of ``n_times`` times, drawn uniformly in ``[0, t_max]`` and sorted
    (the first at 0), shared by every series; each series is a sum of
    ``components`` sinusoids,

    .. math::  x_b(t) = \sum_{k} \frac{1}{K} \sin(2\pi f_{b,k} t + \varphi_{b,k}) + \epsilon,

    with frequencies :math:`f \sim \mathcal U(\text{frequency})`, phases
    :math:`\varphi \sim \mathcal U(0, 2\pi)` and noise :math:`\epsilon \sim \mathcal N(0, \text{noise}^2)`;
    a random fraction ``observed`` of each series' grid points is marked
    observed (at least two), the rest are the points to be predicted.

    Returns:
        ``{"times": (T,), "values": (n, T, 1) (every point, noisy), "mask": (n, T, 1) bool (observed),
        "frequency": (n, K), "phase": (n, K)}``.
    """
    where = "periodic_series"
    n, n_times, components = (_positive_int(where, "n", n), _positive_int(where, "n_times", n_times, 2),
                              _positive_int(where, "components", components))
    observed = _fraction(where, "observed", observed)
    if not (len(frequency) == 2 and 0 < frequency[0] <= frequency[1]):
        raise ValueError(f"{where}: frequency must be a range (low, high) with 0 < low <= high, got {frequency!r}")
    g = torch.Generator().manual_seed(seed)
    times = torch.cat([torch.zeros(1, dtype=torch.float64),
                       torch.sort(torch.rand(n_times - 1, generator=g, dtype=torch.float64)).values * t_max])
    freq = frequency[0] + (frequency[1] - frequency[0]) * torch.rand(n, components, generator=g, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(n, components, generator=g, dtype=torch.float64)
    clean = torch.sin(2 * math.pi * freq[:, None, :] * times[None, :, None] + phase[:, None, :]).mean(-1)
    values = clean + noise * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    count = max(2, round(observed * n_times))
    ranks = torch.rand(n, n_times, generator=g).argsort(dim=1).argsort(dim=1)
    mask = ranks < count
    return {"times": times.to(dtype), "values": values.unsqueeze(-1).to(dtype), "mask": mask.unsqueeze(-1),
            "frequency": freq.to(dtype), "phase": phase.to(dtype)}


#: the stroke classes of :func:`character_trajectories`
STROKE_CLASSES = ("circle", "zigzag", "loop", "hook")


def _stroke(kind: int, u: torch.Tensor) -> torch.Tensor:
    """Pen position ``(…, T, 2)`` of stroke class ``kind`` at path parameter ``u`` in [0, 1]."""
    if kind == 0:    # a circle drawn from the top
        a = 2 * math.pi * u
        return torch.stack([torch.sin(a), torch.cos(a)], dim=-1)
    if kind == 1:    # a zigzag: two down-up strokes
        x = 2 * u - 1
        y = 1 - 2 * (torch.remainder(2 * u, 1.0) - 0.5).abs() * 2
        return torch.stack([x, y], dim=-1)
    if kind == 2:    # an "e"-like loop: a circle that exits to the right
        a = 2.5 * math.pi * u
        return torch.stack([0.8 * torch.cos(a) + 0.6 * u, 0.8 * torch.sin(a)], dim=-1)
    # a hook: down, then curling left
    x = torch.where(u < 0.6, torch.zeros_like(u), -0.7 * (1 - torch.cos((u - 0.6) / 0.4 * math.pi)) / 2)
    y = torch.where(u < 0.6, 1 - 2.5 * u, -0.5 - 0.5 * torch.sin((u - 0.6) / 0.4 * math.pi))
    return torch.stack([x, y], dim=-1)


def character_trajectories(n: int, *, length: int = 50, drop: float = 0.3, noise: float = 0.03,
                           classes: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    r"""Synthetic 2-D pen trajectories of a few stroke classes, irregularly sampled, with dropped points.

    A stand-in for the UEA CharacterTrajectories set that Kidger et al. (2020) use
    (pen tip positions of handwritten characters, 30 %/50 %/70 % of points dropped).
    Each sample draws a class (``circle``, ``zigzag``, ``loop``, ``hook``), a random
    scale, rotation, offset and writing speed (the path parameter is
    :math:`u(t) = t + a \sin(\pi t)/\pi`, :math:`|a| < 0.5`, a smooth monotone
    warp), its own ``length`` observation times — 0, 1 and sorted uniform times
    between — the pen position at those times plus Gaussian ``noise``, and then
    a fraction ``drop`` of its interior points set to NaN (both channels).

    Returns:
        ``{"times": (n, length) per sample, "values": (n, length, 2) with NaN where dropped,
        "labels": (n,) int64, "classes": the class names}``.
    """
    where = "character_trajectories"
    n, length = _positive_int(where, "n", n), _positive_int(where, "length", length, 3)
    classes = _positive_int(where, "classes", classes)
    if classes > len(STROKE_CLASSES):
        raise ValueError(f"{where}: classes must be at most {len(STROKE_CLASSES)}, got {classes}")
    drop = _fraction(where, "drop", drop, allow_one=False)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    inner = torch.sort(torch.rand(n, length - 2, generator=g, dtype=torch.float64), dim=1).values
    times = torch.cat([torch.zeros(n, 1, dtype=torch.float64), inner, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    warp = (torch.rand(n, 1, generator=g, dtype=torch.float64) - 0.5) * 0.9
    u = times + warp * torch.sin(math.pi * times) / math.pi
    pen = torch.zeros(n, length, 2, dtype=torch.float64)
    for k in range(classes):  # one vectorised evaluation per class
        sel = labels == k
        pen[sel] = _stroke(k, u[sel])
    angle = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 0.6
    scale = 0.8 + 0.4 * torch.rand(n, 1, 1, generator=g, dtype=torch.float64)
    rot = torch.stack([torch.stack([angle.cos(), -angle.sin()], -1), torch.stack([angle.sin(), angle.cos()], -1)], -2)
    offset = 0.2 * torch.randn(n, 1, 2, generator=g, dtype=torch.float64)
    pen = scale * pen @ rot.transpose(-1, -2) + offset
    pen = pen + noise * torch.randn(pen.shape, generator=g, dtype=torch.float64)
    n_drop = round(drop * (length - 2))
    if n_drop:
        ranks = torch.rand(n, length - 2, generator=g).argsort(dim=1).argsort(dim=1)
        dropped = torch.cat([torch.zeros(n, 1, dtype=torch.bool), ranks < n_drop, torch.zeros(n, 1, dtype=torch.bool)],
                            dim=1)
        pen[dropped] = float("nan")
    return {"times": times.to(dtype), "values": pen.to(dtype), "labels": labels,
            "classes": STROKE_CLASSES[:classes]}


#: the 41 variables of Rubanova et al.'s PhysioNet preprocessing, in their order (RecordID is dropped)
PHYSIONET_PARAMETERS = (
    "Age", "Gender", "Height", "ICUType", "Weight", "Albumin", "ALP", "ALT", "AST", "Bilirubin", "BUN",
    "Cholesterol", "Creatinine", "DiasABP", "FiO2", "GCS", "Glucose", "HCO3", "HCT", "HR", "K", "Lactate", "Mg",
    "MAP", "MechVent", "Na", "NIDiasABP", "NIMAP", "NISysABP", "PaCO2", "PaO2", "pH", "Platelets", "RespRate",
    "SaO2", "SysABP", "Temp", "TroponinI", "TroponinT", "Urine", "WBC")


def _read_record(path: str, quantization: float, index: dict) -> tuple[str, list, list, list]:
    """One patient file: ``(record id, times (h), values rows, mask rows)``, repeated measurements averaged."""
    record_id = os.path.splitext(os.path.basename(path))[0]
    times, rows, masks, counts = [0.0], [[0.0] * len(index)], [[0.0] * len(index)], [[0] * len(index)]
    with open(path) as fh:
        header = fh.readline().strip()
        if header.replace(" ", "") != "Time,Parameter,Value":
            raise ValueError(f"physionet: {path} does not start with the header 'Time,Parameter,Value' of the "
                             f"PhysioNet 2012 set-a files (got {header[:40]!r})")
        for line_no, line in enumerate(fh, start=2):
            line = line.strip()
            if not line:
                continue
            try:
                stamp, name, raw = line.split(",")
                hours, minutes = stamp.split(":")
                value = float(raw)
                t = float(hours) + float(minutes) / 60.0
            except ValueError:
                raise ValueError(f"physionet: {path}, line {line_no}: expected 'HH:MM,Parameter,Value', got "
                                 f"{line[:60]!r}") from None
            t = round(t / quantization) * quantization
            if t != times[-1]:
                times.append(t)
                rows.append([0.0] * len(index))
                masks.append([0.0] * len(index))
                counts.append([0] * len(index))
            if name == "RecordID":
                continue
            if name not in index:
                raise ValueError(f"physionet: {path}, line {line_no}: unknown parameter {name!r}")
            j = index[name]
            k = counts[-1][j]
            rows[-1][j] = (rows[-1][j] * k + value) / (k + 1)
            masks[-1][j] = 1.0
            counts[-1][j] = k + 1
    return record_id, times, rows, masks


def physionet(path: str, *, quantization: float = 0.1, outcomes: str | None = None,
              dtype: torch.dtype = torch.float32) -> dict:
    r"""The PhysioNet 2012 challenge records of a local directory, preprocessed as by Rubanova et al. (2019).

    Reads every ``*.txt`` patient file in ``path`` (the ``set-a`` files: a header
    ``Time,Parameter,Value`` and lines ``HH:MM,Parameter,Value``). Per record, as
    in Rubanova et al.'s ``physionet.py``: times in hours, rounded to multiples of
    ``quantization`` (0.1 h); a first row at time 0; the 41 variables of
    :data:`PHYSIONET_PARAMETERS` (``RecordID`` dropped); repeated measurements of
    a variable at one rounded time averaged. Then per variable, over the whole
    directory, min–max normalisation of the observed values,
    :math:`(x - \min) / (\max - \min)` (a range of 0 counts as 1), missing entries 0.

    Args:
        path: the directory holding the record files.
        quantization: the time grid in hours (> 0).
        outcomes: an ``Outcomes-a.txt`` file (``RecordID,...,In-hospital_death``);
            default: ``Outcomes-a.txt`` in ``path`` or its parent, if present.

    Returns:
        ``{"record_ids": list, "times": (N, T) hours, padded by repeating the last time,
        "values": (N, T, 41) normalised (0 where missing), "mask": (N, T, 41) bool,
        "lengths": (N,), "labels": (N,) in-hospital death (NaN without outcomes),
        "parameters": PHYSIONET_PARAMETERS, "data_min": (41,), "data_max": (41,)}``.
        The padded ``times`` suit :class:`~pylux.layers.ODERNN` directly (a repeated
        time is a zero step).

    Raises:
        FileNotFoundError: ``path`` is not a directory or holds no ``.txt`` record.
        ValueError: a malformed file (named, with the line).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"physionet: {path!r} is not a directory; pass the folder with the set-a "
                                "record files (e.g. .../set-a)")
    if not (isinstance(quantization, (int, float)) and quantization > 0):
        raise ValueError(f"physionet: quantization must be > 0 hours, got {quantization!r}")
    names = sorted(f for f in os.listdir(path) if f.endswith(".txt") and not f.startswith("Outcomes"))
    if not names:
        raise FileNotFoundError(f"physionet: no record files (*.txt) in {path!r}")
    index = {name: j for j, name in enumerate(PHYSIONET_PARAMETERS)}
    records = [_read_record(os.path.join(path, f), float(quantization), index) for f in names]
    longest = max(len(r[1]) for r in records)
    n, d = len(records), len(PHYSIONET_PARAMETERS)
    times = torch.zeros(n, longest, dtype=torch.float64)
    values = torch.zeros(n, longest, d, dtype=torch.float64)
    mask = torch.zeros(n, longest, d, dtype=torch.bool)
    lengths = torch.zeros(n, dtype=torch.long)
    for i, (_, tt, rows, masks) in enumerate(records):
        k = len(tt)
        times[i, :k] = torch.tensor(tt, dtype=torch.float64)
        times[i, k:] = tt[-1]
        values[i, :k] = torch.tensor(rows, dtype=torch.float64)
        mask[i, :k] = torch.tensor(masks, dtype=torch.float64).bool()
        lengths[i] = k
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    data_min = torch.where(mask, values, inf).amin(dim=(0, 1))
    data_max = torch.where(mask, values, -inf).amax(dim=(0, 1))
    span = data_max - data_min
    span = torch.where((span == 0) | ~torch.isfinite(span), torch.ones_like(span), span)
    shift = torch.where(torch.isfinite(data_min), data_min, torch.zeros_like(data_min))
    values = torch.where(mask, (values - shift) / span, torch.zeros_like(values))
    labels = torch.full((n,), float("nan"), dtype=torch.float64)
    outcome_file = outcomes
    if outcome_file is None:
        for folder in (path, os.path.dirname(os.path.abspath(path))):
            candidate = os.path.join(folder, "Outcomes-a.txt")
            if os.path.isfile(candidate):
                outcome_file = candidate
                break
    if outcome_file is not None:
        deaths = {}
        with open(outcome_file) as fh:
            fh.readline()
            for line in fh:
                parts = line.strip().split(",")
                if len(parts) >= 6:
                    deaths[parts[0]] = float(parts[5])
        ids = [r[0] for r in records]
        labels = torch.tensor([deaths.get(i, float("nan")) for i in ids], dtype=torch.float64)
    return {"record_ids": [r[0] for r in records], "times": times.to(dtype), "values": values.to(dtype),
            "mask": mask, "lengths": lengths, "labels": labels.to(dtype), "parameters": PHYSIONET_PARAMETERS,
            "data_min": data_min.to(dtype), "data_max": data_max.to(dtype)}
