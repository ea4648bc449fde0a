"""Shared command-line grammar and reporting of the experiments.

Every experiment takes the same options (:func:`add_common_arguments`):
``--seeds N`` (seeds 0..N-1), ``--methods a,b`` (a comma list; default all),
``--quick`` (1 seed at smoke-test scale, seconds), ``--threads T`` (torch CPU
threads) and ``--out DIR`` (added by the CLI), and writes the same files under
``--out``: ``results.md``, ``results.json`` and PNG plots (``training.png``:
loss and NFE over training, mean ± one standard deviation over seeds).

Tables report mean ± sample standard deviation over seeds; a comparison
table (:func:`paper_comparison`) puts the paper's number beside ours and says
whether the direction of the paper's claim (e.g. "fewer NFE than vanilla")
was reproduced.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics

import torch

from ..training import progress_bar

__all__ = ["summarize", "markdown_table", "plot_histories", "plot_fit", "write_results", "add_common_arguments",
           "parse_methods", "check_seeds", "torch_threads", "paper_comparison", "report_written", "progress"]


def add_common_arguments(parser, methods, *, quick: str, seeds: int = 3) -> None:
    """Add ``--seeds``, ``--methods``, ``--quick`` and ``--threads``, the options every experiment shares.

    Args:
        parser: the experiment's ``argparse`` (sub)parser.
        methods: the experiment's method names, in order (the ``--methods`` default is all of them).
        quick: what ``--quick`` sets, for the help text (e.g. ``"1 seed, 2 epochs"``).
        seeds: the default number of seeds.
    """
    parser.add_argument("--seeds", type=int, default=seeds, help=f"number of seeds, 0..N-1 (default {seeds})")
    parser.add_argument("--methods", default=",".join(methods),
                        help=f"comma-separated subset of {','.join(methods)} (default: all)")
    parser.add_argument("--quick", action="store_true", help=f"smoke-test preset: {quick}")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1; timings depend on it)")


def parse_methods(text: str, known, experiment: str) -> list[str]:
    """The methods of a ``--methods a,b`` value, in the given order; unknown or no names raise ValueError."""
    methods = list(dict.fromkeys(m.strip() for m in str(text).split(",") if m.strip()))
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"{experiment}: unknown method(s) {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(known)}")
    if not methods:
        raise ValueError(f"{experiment}: --methods names no method; choose from {', '.join(known)}")
    return methods


def check_seeds(seeds: int, experiment: str) -> int:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"{experiment}: --seeds is the number of seeds (seeds 0..N-1) and must be >= 1, "
                         f"got {seeds!r}")
    return seeds


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run the block with ``torch.set_num_threads(threads)``, restoring the previous count afterwards."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {threads!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def progress(total: int, description: str):
    """A progress bar (a widget in Jupyter with ipywidgets, text elsewhere) that leaves no line behind."""
    return progress_bar(total=total, desc=description, leave=False)


def summarize(runs: list[dict], keys) -> dict:
    """``{key: (mean, sample std)}`` of each key over the runs (std 0 for a single run)."""
    out = {}
    for key in keys:
        values = [r[key] for r in runs]
        out[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def markdown_table(summary: dict, columns, title: str = "method") -> str:
    """Rows ``| method | mean ± std | ...`` for ``columns`` of ``(key, label, format)``."""
    head = f"| {title} | " + " | ".join(label for _, label, _ in columns) + " |"
    rule = "|---" * (len(columns) + 1) + "|"
    rows = [head, rule]
    for method, stats in summary.items():
        cells = [f"{fmt.format(stats[key][0])} ± {fmt.format(stats[key][1])}" for key, _, fmt in columns]
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def paper_comparison(summary: dict, claims, title: str = "method") -> tuple[str, list[dict]]:
    r"""The paper's claims beside our ratios, and whether the claimed direction was reproduced.

    Each claim is a dict with ``method``, ``baseline`` (the row it is compared to,
    e.g. ``"vanilla"``), ``metric`` (a key of ``summary[method]``), ``label``
    (what is compared, e.g. ``"test NFE"``), ``paper`` (the paper's number as
    text, e.g. ``"0.556x-0.733x"``), ``source`` (where it is stated) and
    ``direction`` (``"lower"`` or ``"higher"``: the claim is that the method's
    metric is below / above the baseline's). Ours is the ratio of the means
    :math:`\bar m_{method} / \bar m_{baseline}`; the direction is reproduced when
    that ratio is below 1 for ``"lower"`` (above 1 for ``"higher"``). Claims whose
    rows were not run are left out.

    Returns:
        ``(markdown, records)``: the table (sources as numbered notes below it), and one dict per row with the claim,
        ``ratio`` and ``reproduced``.
    """
    lines = [f"| {title} | compared with | quantity | paper | ours (ratio of means) | direction reproduced | source |",
             "|---|---|---|---|---|---|---|"]
    records, sources = [], {}
    for claim in claims:
        mine, base = summary.get(claim["method"]), summary.get(claim["baseline"])
        if mine is None or base is None:
            continue
        if claim["direction"] not in ("lower", "higher"):
            raise ValueError(f"paper_comparison: direction must be 'lower' or 'higher', got {claim['direction']!r}")
        denominator = base[claim["metric"]][0]
        ratio = mine[claim["metric"]][0] / denominator if denominator else float("nan")
        reproduced = ratio < 1.0 if claim["direction"] == "lower" else ratio > 1.0
        records.append({**claim, "ratio": ratio, "reproduced": bool(reproduced)})
        number = sources.setdefault(claim["source"], len(sources) + 1)
        lines.append(f"| {claim['method']} | {claim['baseline']} | {claim['label']} ({claim['direction']}) | "
                     f"{claim['paper']} | {ratio:.2f}x | {'yes' if reproduced else 'no'} | [{number}] |")
    if not records:
        return "", records
    notes = [f"[{number}] {source}" for source, number in sources.items()]
    return "\n".join(lines) + "\n\n" + "\n".join(notes), records


def _series(runs: list[dict], key: str):
    """Mean and std over seeds of the runs that record ``key`` (cut to the shortest run), or None."""
    values = [r[key] for r in runs if r.get(key)]
    if not values:
        return None
    length = min(len(v) for v in values)
    stacked = torch.tensor([v[:length] for v in values], dtype=torch.float64)
    std = stacked.std(0) if stacked.shape[0] > 1 else torch.zeros(length, dtype=torch.float64)
    return stacked.mean(0).numpy(), std.numpy(), stacked.shape[0]


def _pyplot():
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return None
    return plt


def plot_histories(histories: dict, path: str, title: str, *, x_label: str = "training step") -> str | None:
    """Loss and NFE over training, mean ± one standard deviation over seeds (a shaded band).

    Args:
        histories: ``{method: [run, ...]}``, one ``run`` dict per seed with lists
            ``"loss"`` (the training objective) and ``"nfe"`` (forward evaluations),
            and optionally ``"data_loss"`` (the objective without the regularization
            term) and ``"reg"`` (the weighted regularization term that was added).
            With ``"data_loss"`` the loss panel shows it and a separate panel shows
            ``"reg"``, so that a falling regularizer is not mistaken for a better fit.
            Runs of different lengths are cut to the shortest.
        path: where to write the PNG.
        title: the figure's title (the number of seeds behind the bands is appended).
        x_label: the x axis (one point per record).

    Returns:
        ``path``, or ``None`` when matplotlib is missing (one line is printed).
    """
    plt = _pyplot()
    if plt is None:
        return None
    has_data_loss = any(r.get("data_loss") for runs in histories.values() for r in runs)
    has_reg = any(r.get("reg") for runs in histories.values() for r in runs)
    panels = [("data_loss", "data loss (without the regularization term)") if has_data_loss
              else ("loss", "training loss")]
    if has_reg:
        panels.append(("reg", "regularization term (weighted)"))
    panels.append(("nfe", "forward NFE"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    seeds = set()
    colours = plt.get_cmap("tab20" if len(histories) > 10 else "tab10").colors
    for number, (method, runs) in enumerate(histories.items()):
        colour = colours[number % len(colours)]
        for ax, (key, _) in zip(axes[0], panels):
            series = _series(runs, key)
            if series is None:
                continue
            mean, std, n = series
            seeds.add(n)
            x = range(1, len(mean) + 1)
            ax.plot(x, mean, color=colour, lw=1, label=method, marker="o" if len(mean) < 30 else None, ms=3)
            if n > 1:
                ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.2, lw=0)
    for ax, (key, label) in zip(axes[0], panels):
        ax.set(xlabel=x_label, ylabel=label)
        if key in ("loss", "data_loss") and all(line.get_ydata().min() > 0 for line in ax.get_lines()):
            ax.set_yscale("log")
    axes[0][-1].legend(fontsize=7, ncol=2 if len(histories) > 6 else 1)
    counts = "/".join(str(n) for n in sorted(seeds)) or "0"
    band = "lines: mean over seeds, bands: ± 1 std" if max(seeds, default=1) > 1 else "one seed, no band"
    fig.suptitle(f"{title} ({counts} seed(s); {band})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_fit(t, data, fits: dict, path: str, title: str, labels=("u1", "u2")) -> str | None:
    """A fitted trajectory against the data: the phase plane and each component against time.

    Args:
        t: observation times, shape ``(T,)``.
        data: observations, shape ``(T, 2)``.
        fits: ``{method: [prediction, ...]}``, one ``(T, 2)`` prediction per seed
            (the first seed drawn solid, the others faint).
        path: where to write the PNG.
        title: the figure's title.
        labels: names of the two components.

    Returns:
        ``path``, or ``None`` when matplotlib is missing.
    """
    plt = _pyplot()
    if plt is None:
        return None
    t = torch.as_tensor(t, dtype=torch.float64).numpy()
    data = torch.as_tensor(data, dtype=torch.float64).numpy()
    fig, (ax_phase, ax_time) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax_phase.plot(data[:, 0], data[:, 1], "ko", ms=3, label="data")
    for k in range(2):
        ax_time.plot(t, data[:, k], "ko", ms=3, label="data" if k == 0 else None)
    colours = plt.get_cmap("tab10").colors
    for number, (method, predictions) in enumerate(fits.items()):
        colour = colours[number % len(colours)]
        for seed, prediction in enumerate(predictions):
            u = torch.as_tensor(prediction, dtype=torch.float64).numpy()
            alpha, label = (1.0, f"{method} (seed 0)") if seed == 0 else (0.35, None)
            ax_phase.plot(u[:, 0], u[:, 1], color=colour, alpha=alpha, lw=1.2, label=label)
            for k, style in enumerate(("-", "--")):
                ax_time.plot(t, u[:, k], style, color=colour, alpha=alpha, lw=1.2,
                             label=f"{method} {labels[k]}" if seed == 0 else None)
    ax_phase.set(xlabel=labels[0], ylabel=labels[1], title="phase plane")
    ax_time.set(xlabel="t", ylabel=f"{labels[0]} (solid), {labels[1]} (dashed)", title="against time")
    ax_phase.legend(fontsize=7)
    ax_time.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(out: str, text: str, payload: dict) -> None:
    """Write ``results.md`` (``text``) and ``results.json`` (``payload``) under ``out``."""
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(payload, fh, indent=1, default=str)


def report_written(out: str, plots) -> None:
    """Print where the results went (the last line an experiment prints)."""
    names = ["results.md", "results.json"] + [os.path.basename(p) for p in plots if p]
    print(f"wrote {os.path.abspath(out)}: {', '.join(names)}")
