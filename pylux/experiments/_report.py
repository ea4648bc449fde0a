"""Shared reporting of the experiments: mean ± std summaries, markdown tables, plots, result files."""

from __future__ import annotations

import json
import os
import statistics

import torch

__all__ = ["summarize", "markdown_table", "plot_histories", "write_results"]


def summarize(runs: list[dict], keys) -> dict:
    out = {}
    for key in keys:
        values = [r[key] for r in runs]
        out[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def markdown_table(summary: dict, columns, title: str = "method") -> str:
    head = f"| {title} | " + " | ".join(label for _, label, _ in columns) + " |"
    rule = "|---" * (len(columns) + 1) + "|"
    rows = [head, rule]
    for method, stats in summary.items():
        cells = [f"{fmt.format(stats[key][0])} ± {fmt.format(stats[key][1])}" for key, _, fmt in columns]
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_histories(histories: dict, path: str, title: str) -> str | None:
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib is not installed: skipping the plot")
        return None
    fig, (ax_loss, ax_nfe) = plt.subplots(1, 2, figsize=(11, 4))
    for method, runs in histories.items():
        loss = torch.tensor([r["loss"] for r in runs], dtype=torch.float64).mean(0)
        nfe = torch.tensor([r["nfe"] for r in runs], dtype=torch.float64).mean(0)
        ax_loss.plot(loss.numpy(), label=method, lw=1)
        ax_nfe.plot(nfe.numpy(), label=method, lw=1)
    ax_loss.set(xlabel="training step", ylabel="training loss (incl. regularization)", yscale="log")
    ax_nfe.set(xlabel="training step", ylabel="forward NFE")
    ax_nfe.legend(fontsize=8)
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
