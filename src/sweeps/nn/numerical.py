"""Numerical gradients by central differences (book 4.4), over a model's flat parameters."""

from __future__ import annotations

import numpy as np


def numerical_gradient(model, x: np.ndarray, t: np.ndarray, h: float = 1e-4) -> float:
    """Fill ``model.flat_grads`` with (L(p+h) - L(p-h)) / 2h for every parameter and return
    the loss at p. Training mode, so BN uses batch statistics. Dropout draws one set of masks
    for the batch, as a backprop step does, and every perturbed pass reuses it: with a fresh
    mask per pass the differences would measure the masks, not the parameters. Slow by
    nature: two forward passes per parameter."""
    p, g = model.flat_params, model.flat_grads
    model.set_dropout_frozen(False)
    value = model.loss(x, t, train=True)  # draws this batch's dropout masks
    model.set_dropout_frozen(True)
    try:
        for i in range(p.size):
            old = p[i]
            p[i] = old + h
            plus = model.loss(x, t, train=True)
            p[i] = old - h
            minus = model.loss(x, t, train=True)
            p[i] = old
            g[i] = (plus - minus) / (2 * h)
    finally:
        model.set_dropout_frozen(False)
    return value
