"""Weight initialization schemes, one place for all of them.

Each scheme maps (shape, fan_in, fan_out, rng) to a weight array. For a dense layer
W is (fan_in, fan_out); for a convolution W is (FN, C, FH, FW) with fan_in = C*FH*FW and
fan_out = FN*FH*FW. Biases always start at zero.

========= ================================ ===============================================
name      distribution                     source
========= ================================ ===============================================
std       N(0, std^2), std = 0.01 default  the book's ``weight_init_std=0.01`` (ch04-ch07)
xavier    N(0, 1/fan_in)                   Glorot & Bengio 2010 as the book defines it (6.2.2)
he        N(0, 2/fan_in)                   He et al. 2015 (book 6.2.3)
uniform   U(low, high)                     e.g. [0, 0.1] in "Deep Learning with Python"
receiving N(0, 1/fan_out)                  "Make Your Own Neural Network": std = 1/sqrt(nodes
                                           in the receiving layer)
glorot_uniform U(-a, a), a = sqrt(6/(fan_in+fan_out))  Keras' default kernel initializer
========= ================================ ===============================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Init:
    """An initialization scheme with its hyperparameters (``std`` for ``std``; ``low`` and
    ``high`` for ``uniform``)."""

    name: str = "he"
    std: float = 0.01
    low: float = 0.0
    high: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in SCHEMES:
            raise ValueError(f"unknown init {self.name!r}; choose from {sorted(SCHEMES)}")
        if self.name == "std" and not self.std > 0:
            raise ValueError(f"init.std must be > 0, got {self.std!r}")
        if self.name == "uniform" and not self.low < self.high:
            raise ValueError(
                f"init.low must be < init.high, got low={self.low!r}, high={self.high!r}"
            )

    def scale(self, fan_in: int, fan_out: int) -> float:
        """The standard deviation (normal schemes) used for a layer with these fans."""
        return {
            "std": self.std,
            "xavier": math.sqrt(1.0 / fan_in),
            "he": math.sqrt(2.0 / fan_in),
            "receiving": math.sqrt(1.0 / fan_out),
        }[self.name]

    def __call__(
        self, shape: tuple[int, ...], fan_in: int, fan_out: int, rng: np.random.Generator, dtype
    ) -> np.ndarray:
        return SCHEMES[self.name](self, shape, fan_in, fan_out, rng).astype(dtype, copy=False)


def _normal(init: Init, shape, fan_in, fan_out, rng):
    return rng.standard_normal(shape) * init.scale(fan_in, fan_out)


def _uniform(init: Init, shape, fan_in, fan_out, rng):
    return rng.uniform(init.low, init.high, size=shape)


def _glorot_uniform(init: Init, shape, fan_in, fan_out, rng):
    a = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-a, a, size=shape)


SCHEMES: dict[str, Callable[..., np.ndarray]] = {
    "std": _normal,
    "xavier": _normal,
    "he": _normal,
    "receiving": _normal,
    "uniform": _uniform,
    "glorot_uniform": _glorot_uniform,
}
