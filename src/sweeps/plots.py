"""Figures for a run: learning curves and the book's per-layer activation histograms.

Matplotlib with the Agg backend (no display needed); each function returns a Figure.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from sweeps.nn.functional import smooth_curve  # noqa: E402


def learning_curves(
    epochs: list[dict[str, float]], batch_losses: list[float], title: str = ""
) -> Figure:
    """Left: batch loss (raw and smoothed as in the book) per iteration. Right: train and
    validation accuracy per epoch (the book's ylim 0-1)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    if batch_losses:
        it = np.arange(1, len(batch_losses) + 1)
        ax_loss.plot(it, batch_losses, color="0.8", lw=0.6, label="batch")
        ax_loss.plot(it, smooth_curve(np.asarray(batch_losses)), lw=1.4, label="smoothed")
    ax_loss.set(xlabel="iteration", ylabel="training loss", title="loss")
    ax_loss.legend()
    ep = [e["epoch"] for e in epochs]
    for key, style in (("train/acc", "--"), ("val/acc", "-")):
        ys = [e[key] for e in epochs if key in e]
        if ys:
            ax_acc.plot(ep[: len(ys)], ys, style, marker="o", ms=3, label=key.split("/")[0])
    ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title="accuracy")
    ax_acc.legend()
    if title:
        fig.suptitle(title)
    return fig


def activation_histograms(
    activations: list[np.ndarray], names: list[str], title: str = "", bins: int = 30
) -> Figure:
    """One histogram per hidden layer, as in the book's figures 6-10 to 6-14: 30 bins over
    (0, 1) for sigmoid, (-1, 1) for tanh, and from 0 to the 99.9th percentile for ReLU."""
    n = max(len(activations), 1)
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n, 2.6), sharey=True, layout="constrained")
    axes = np.atleast_1d(axes)
    for i, (a, name, ax) in enumerate(zip(activations, names, axes, strict=False), 1):
        flat = a.ravel()
        if name == "sigmoid":
            rng = (0.0, 1.0)
        elif name == "tanh":
            rng = (-1.0, 1.0)
        else:
            hi = float(np.percentile(flat, 99.9)) if flat.size else 1.0
            rng = (0.0, hi if hi > 0 else 1.0)
        ax.hist(flat, bins=bins, range=rng)
        ax.set_title(f"{i}-layer ({name})", fontsize=9)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
