"""Figures for a run: learning curves and the book's per-layer activation histograms.

Object-oriented Matplotlib only (``Figure`` on an Agg canvas, never pyplot), so the tracking
callback can draw them on its background thread. A run logs three of them, so they are
built to be cheap: fixed margins instead of constrained layout (which lays the figure out
again at save time), titles at a fixed height (automatic placement measures every tick
label first), a few ticks per axis (each tick is four artists), one ``stairs`` patch per
histogram instead of a patch per bin, legends at a fixed corner rather than searched for,
and a PNG written with fast zlib compression (``png_bytes``). They keep 100 dpi: people
read them in the MLflow UI.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # callers that use pyplot (compare.py) rely on this module to pick Agg

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from sweeps.nn.functional import smooth_curve  # noqa: E402

DPI = 100
TICKS = 5
NICE_STEPS = [1, 2, 2.5, 5, 10]  # tick spacings: 0, 0.5, 1 or 0, 20000, 40000, never 15000
TITLE_Y = 1.0  # a fixed title height: automatic placement measures every tick label first
PNG_COMPRESS_LEVEL = 1  # zlib level: ~1.5x faster than PIL's default 6, files ~1.2x larger


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def _axes(fig: Figure, n: int, **kw) -> list:
    """n panels side by side, at most ``TICKS`` ticks per axis."""
    axes = list(np.atleast_1d(fig.subplots(1, n, **kw)))
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(TICKS, steps=NICE_STEPS))
        ax.yaxis.set_major_locator(MaxNLocator(TICKS, steps=NICE_STEPS))
    return axes


def _margins(fig: Figure, left: float, right: float, bottom: float, top: float, **kw) -> None:
    """Fixed margins given in inches, whatever the figure's size."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(
        left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h, **kw
    )


def learning_curves(
    epochs: list[dict[str, float]], batch_losses: list[float], title: str = ""
) -> Figure:
    """Left: batch loss (raw and smoothed as in the book) per iteration. Right: train and
    validation accuracy per epoch (the book's ylim 0-1)."""
    fig = _figure(10, 3.8)
    _margins(fig, left=0.7, right=0.15, bottom=0.55, top=0.65 if title else 0.35, wspace=0.2)
    ax_loss, ax_acc = _axes(fig, 2)
    if batch_losses:
        it = np.arange(1, len(batch_losses) + 1)
        ax_loss.plot(it, batch_losses, color="0.8", lw=0.6, label="batch")
        ax_loss.plot(it, smooth_curve(np.asarray(batch_losses)), lw=1.4, label="smoothed")
    ax_loss.set(xlabel="iteration", ylabel="training loss")
    ax_loss.set_title("loss", y=TITLE_Y)
    ax_loss.legend(loc="upper right")
    ep = [e["epoch"] for e in epochs]
    for key, style in (("train/acc", "--"), ("val/acc", "-")):
        ys = [e[key] for e in epochs if key in e]
        if ys:
            ax_acc.plot(ep[: len(ys)], ys, style, marker="o", ms=3, label=key.split("/")[0])
    ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1))
    ax_acc.set_title("accuracy", y=TITLE_Y)
    ax_acc.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    return fig


def histogram_range(a: np.ndarray, name: str) -> tuple[float, float]:
    """The book's ranges: (0, 1) for sigmoid, (-1, 1) for tanh, and from 0 to the 99.9th
    percentile for ReLU (a few large activations would otherwise squash the rest)."""
    if name == "sigmoid":
        return 0.0, 1.0
    if name == "tanh":
        return -1.0, 1.0
    hi = float(np.percentile(a, 99.9)) if a.size else 1.0
    return 0.0, hi if hi > 0 else 1.0


def activation_histograms(
    activations: list[np.ndarray], names: list[str], title: str = "", bins: int = 30
) -> Figure:
    """One histogram per hidden layer, as in the book's figures 6-10 to 6-14: 30 bins over
    ``histogram_range`` (values outside it are not counted, as with ``plt.hist(range=...)``)."""
    n = max(len(activations), 1)
    fig = _figure(2.4 * n, 2.6)
    _margins(fig, left=0.55, right=0.1, bottom=0.3, top=0.6 if title else 0.3, wspace=0.08)
    axes = _axes(fig, n, sharey=True)
    for i, (a, name, ax) in enumerate(zip(activations, names, axes, strict=False), 1):
        counts, edges = np.histogram(a.ravel(), bins=bins, range=histogram_range(a, name))
        ax.stairs(counts, edges, fill=True)
        ax.set_title(f"{i}-layer ({name})", fontsize=9, y=TITLE_Y)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG (at its own dpi), compressed for speed rather than size."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    return buf.getvalue()


def close(fig: Figure) -> None:
    """Release a pyplot-managed figure (compare.py, Optuna's plots); the figures built here
    are not registered with pyplot and are freed like any object."""
    import matplotlib.pyplot as plt

    plt.close(fig)
