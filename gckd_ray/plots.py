"""PNG figures: training curves from metrics.jsonl records, and the search CLI's result grid.

Figures are drawn on matplotlib's Agg canvas through ``matplotlib.figure.Figure`` (no pyplot,
no global backend state), and written to a temporary name then renamed, so a reader never
sees half a PNG.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

RANK_METRICS = ("R1", "R5", "R10", "mAP")


def _save(fig: Figure, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def plot_curves(records: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Losses vs global step (progress records) and target metrics vs epoch (evaluation
    records) of a metrics.jsonl, side by side."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    losses_ax, metrics_ax = fig.subplots(1, 2)
    train = [r for r in records if r.get("kind") == "train"]
    names = sorted({k for r in train for k in r["losses"]}, key=lambda k: (k != "loss", k))
    for name in names:
        points = [(r["step"], r["losses"][name]) for r in train if name in r["losses"]]
        losses_ax.plot(*zip(*points), marker=".", label=name, lw=2 if name == "loss" else 1)
    losses_ax.set(xlabel="step", ylabel="running mean over the epoch", title="training losses")
    if names:
        losses_ax.legend(fontsize="small")
    evals = [r for r in records if r.get("kind") == "eval"]
    for name in RANK_METRICS:
        points = [(r["epoch"], r["metrics"][name]) for r in evals if name in r["metrics"]]
        if points:
            metrics_ax.plot(*zip(*points), marker="o", label=name)
    metrics_ax.set(xlabel="epoch", ylabel="percent", title="target test retrieval")
    metrics_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if evals:
        metrics_ax.legend(fontsize="small")
    _save(fig, path)


def result_grid(query: str, images: Sequence[np.ndarray], captions: Sequence[str],
                correct: Sequence[bool | None], path: str | Path, columns: int = 5) -> None:
    """The top-k gallery images of a query in rank order, the query as the figure title.

    Args:
        images: (H, W, 3) uint8 arrays, best first.
        captions: a short line under each image (rank, score, id).
        correct: per image True (framed green), False (framed red) or None (ids unknown:
            no frame).
    """
    rows = max(1, -(-len(images) // columns))
    cols = min(columns, max(1, len(images)))
    fig = Figure(figsize=(2.0 * cols, 3.6 * rows + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, image, caption, hit in zip(axes, images, captions, correct):
        ax.imshow(image)
        ax.set_title(caption, fontsize="small")
        if hit is not None:
            ax.set_axis_on()
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set(color="tab:green" if hit else "tab:red", linewidth=4)
    fig.suptitle("\n".join(textwrap.wrap(query, 90)[:3]), fontsize="medium")
    _save(fig, path)
