"""The training loop: ``fit`` drives a model and an optimizer over mini-batches and emits
events to callbacks. MLflow logging, Optuna pruning and progress display are callbacks; this
module imports none of them.

Per-epoch metrics follow the book's Trainer: accuracy and loss on the training split and the
validation split, in evaluation mode. The test split is never touched here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from sweeps.nn import Sequential
from sweeps.nn import layers as L
from sweeps.nn.numerical import numerical_gradient
from sweeps.optim import Optimizer, WeightDecay

SAMPLING = ("shuffle", "replacement", "sequential")
GRADIENTS = ("backprop", "numerical")


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainSettings:
    """How to iterate. ``sampling``: ``shuffle`` (a new permutation each epoch), ``replacement``
    (the book's ``np.random.choice(train_size, batch_size)``, max(n // batch, 1) draws per
    epoch) or ``sequential`` (in order, no shuffling). ``iterations`` caps the total number of
    updates (the book's ``iters_num``); the epoch in progress is then evaluated and training
    stops. ``gradient``: ``backprop`` or ``numerical`` (central differences, the book's ch04
    comparison; only for tiny nets, it costs two forward passes per parameter)."""

    epochs: int = 10
    batch_size: int = 100
    sampling: str = "shuffle"
    iterations: int | None = None
    eval_batch_size: int = 1000
    eval_train_size: int | None = None
    probe_size: int = 1000
    gradient: str = "backprop"

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "eval_batch_size", "probe_size"):
            value = getattr(self, key)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"trainer.{key} must be an integer >= 1, got {value!r}")
        for key in ("iterations", "eval_train_size"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"trainer.{key} must be null or an integer >= 1, got {value!r}")
        if self.sampling not in SAMPLING:
            raise ValueError(
                f"unknown trainer.sampling {self.sampling!r}; choose from {list(SAMPLING)}"
            )
        if self.gradient not in GRADIENTS:
            raise ValueError(
                f"unknown trainer.gradient {self.gradient!r}; choose from {list(GRADIENTS)}"
            )


@dataclass
class History:
    """What a fit produced: one metrics dict per epoch and every batch loss."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    batch_losses: list[float] = field(default_factory=list)

    def last(self, key: str) -> float:
        return self.epochs[-1][key]

    def series(self, key: str) -> np.ndarray:
        return np.array([e[key] for e in self.epochs if key in e])


class Callback:
    """Hooks for the training loop. Any hook may raise to stop training (e.g. pruning)."""

    def on_train_start(self, model: Sequential) -> None: ...

    def on_batch_end(self, iteration: int, loss: float) -> None: ...

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], model: Sequential) -> None: ...

    def on_train_end(self, history: History, model: Sequential) -> None: ...


def batches(
    n: int, batch_size: int, sampling: str, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Index arrays for one epoch."""
    if sampling == "replacement":
        for _ in range(max(n // batch_size, 1)):
            yield rng.choice(n, batch_size)
        return
    order = rng.permutation(n) if sampling == "shuffle" else np.arange(n)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


class ActivationStats:
    """Mean, std and the dead (ReLU: exactly 0) or saturated (sigmoid: < 0.05 or > 0.95;
    tanh: |a| > 0.95) fraction of each hidden activation layer's output, over samples given
    chunk by chunk (``add``, the signature of ``Sequential.evaluate``'s ``on_hidden``): each
    chunk's mean and variance are merged into the running ones (Chan, Golub and LeVeque's
    pairwise update), so no chunk is kept."""

    def __init__(self, model: Sequential) -> None:
        layers = [model.layers[i] for i in model.hidden]
        self.kinds = ["dead" if isinstance(layer, L.ReLU) else "saturated" for layer in layers]
        self._sigmoid = [isinstance(layer, L.Sigmoid) for layer in layers]
        n = len(layers)
        self.count, self.flagged = [0] * n, [0] * n
        self.mean, self.m2 = [0.0] * n, [0.0] * n

    def add(self, k: int, a: np.ndarray) -> None:
        n = a.size
        if n == 0:
            return
        mean, m2 = float(a.mean()), float(a.var()) * n
        if self.kinds[k] == "dead":
            flagged = n - int(np.count_nonzero(a))  # -0.0 counts as 0, as ``a == 0`` does
        elif self._sigmoid[k]:
            flagged = int(np.count_nonzero((a < 0.05) | (a > 0.95)))
        else:
            flagged = int(np.count_nonzero(np.abs(a) > 0.95))
        before = self.count[k]
        total = before + n
        delta = mean - self.mean[k]
        self.mean[k] += delta * n / total
        self.m2[k] += m2 + delta * delta * before * n / total
        self.count[k], self.flagged[k] = total, self.flagged[k] + flagged

    def result(self) -> dict[str, float]:
        stats: dict[str, float] = {}
        for k, kind in enumerate(self.kinds):
            n = max(self.count[k], 1)
            stats[f"act/{k + 1}/mean"] = self.mean[k]
            stats[f"act/{k + 1}/std"] = math.sqrt(max(self.m2[k], 0.0) / n)
            stats[f"act/{k + 1}/{kind}"] = self.flagged[k] / n
        return stats


def activation_stats(model: Sequential, x: np.ndarray) -> dict[str, float]:
    """``ActivationStats`` of the hidden activations for x, from a forward pass of their own
    (``fit`` takes them from its evaluation pass instead)."""
    stats = ActivationStats(model)
    for k, a in enumerate(model.hidden_activations(x)):
        stats.add(k, a)
    return stats.result()


def fit(
    model: Sequential,
    optimizer: Optimizer,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None,
    settings: TrainSettings,
    rng: np.random.Generator,
    weight_decay: WeightDecay | None = None,
    callbacks: Sequence[Callback] = (),
) -> History:
    """Train ``model`` in place; return its History.

    Raises DivergedError when a batch loss is not finite ("diverged at epoch k").
    """
    x, t = train
    if x.shape[0] != t.shape[0]:
        raise ValueError(f"{x.shape[0]} training inputs but {t.shape[0]} labels")
    model._check_input(x[:1])
    weight_decay = weight_decay or WeightDecay(0.0)
    history = History()
    p, g, n_decayed = model.flat_params, model.flat_grads, model.n_decayed
    n_eval = x.shape[0] if settings.eval_train_size is None else settings.eval_train_size
    probe = (val[0] if val is not None else x)[: settings.probe_size]
    budget = settings.iterations if settings.iterations is not None else math.inf
    iteration = 0
    gradient = (
        model.gradient if settings.gradient == "backprop" else partial(numerical_gradient, model)
    )
    for cb in callbacks:
        cb.on_train_start(model)
    for epoch in range(1, settings.epochs + 1 if budget == math.inf else 2**62):
        start, first = time.perf_counter(), iteration
        for idx in batches(x.shape[0], settings.batch_size, settings.sampling, rng):
            loss = gradient(x[idx], t[idx])
            if weight_decay.strength:
                loss += weight_decay.penalty(p, n_decayed)
                weight_decay.apply(p, g, n_decayed)
            optimizer.step(p, g)
            iteration += 1
            if not math.isfinite(loss):
                raise DivergedError(
                    f"diverged at epoch {epoch}: training loss {loss} at iteration {iteration}"
                )
            history.batch_losses.append(loss)
            for cb in callbacks:
                cb.on_batch_end(iteration, loss)
            if iteration >= budget:
                break
        train_time = time.perf_counter() - start
        metrics = {
            "epoch": float(epoch),
            "iteration": float(iteration),
            "time/epoch": train_time,
            "time/step": train_time / max(iteration - first, 1),
        }
        # The probe's activation statistics come from an evaluation pass over its samples:
        # the validation split's, else the training split's when it covers them.
        acts = ActivationStats(model)
        from_train = val is None and n_eval >= len(probe)
        metrics["train/loss"], metrics["train/acc"] = model.evaluate(
            x[:n_eval],
            t[:n_eval],
            settings.eval_batch_size,
            hidden_rows=len(probe) if from_train else 0,
            on_hidden=acts.add,
        )
        if val is not None:
            metrics["val/loss"], metrics["val/acc"] = model.evaluate(
                *val, settings.eval_batch_size, hidden_rows=len(probe), on_hidden=acts.add
            )
        if not math.isfinite(metrics["train/loss"]):
            raise DivergedError(f"diverged at epoch {epoch}: training loss {metrics['train/loss']}")
        if val is not None or from_train:
            metrics.update(acts.result())
        else:
            metrics.update(activation_stats(model, probe))
        history.epochs.append(metrics)
        for cb in callbacks:
            cb.on_epoch_end(epoch, metrics, model)
        if iteration >= budget:
            break
    for cb in callbacks:
        cb.on_train_end(history, model)
    return history
