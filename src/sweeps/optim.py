"""Update rules of the book's ``common/optimizer.py`` (Saito, ch06), over flat buffers.

Every optimizer updates one contiguous parameter vector in place from the matching gradient
vector (see ``sweeps.nn.Sequential``), with preallocated state and scratch space, so a step
allocates nothing. Optimizers are listed by increasing complexity; each is the book's rule
with the book's defaults (eps = 1e-7 throughout).

Weight decay is a gradient transform applied between backward and step, as the book does it:
the loss gains 0.5*lambda*sum(W^2) and the gradient lambda*W, for weights only (the leading
``n_decayed`` entries of the buffer); biases and BN parameters are not decayed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

EPS = 1e-7


def _is_number(value) -> bool:
    """A real number: Python's or NumPy's (an lr taken from a float32 array), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _positive(name: str, value: float) -> float:
    if not (_is_number(value) and np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)  # a Python float: NumPy scalars would change the updates' dtype


def _in_unit(name: str, value: float) -> float:
    if not (_is_number(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


class Optimizer:
    """Base class. ``step(p, g)`` updates the flat vector p in place from g."""

    name = "optimizer"

    def __init__(self, lr: float) -> None:
        self.lr = _positive("lr", lr)
        self._size = -1

    def _state(self, p: np.ndarray) -> None:
        """Allocate state on first use, sized like p (the book also creates it lazily)."""
        if self._size != p.size:
            self._size = p.size
            self.tmp = np.empty_like(p)
            self._allocate(p)

    def _allocate(self, p: np.ndarray) -> None:
        pass

    def step(self, p: np.ndarray, g: np.ndarray) -> None:
        raise NotImplementedError

    @property
    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr}


class SGD(Optimizer):
    """p -= lr * g"""

    name = "sgd"

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__(lr)

    def step(self, p, g):
        self._state(p)
        np.multiply(g, self.lr, out=self.tmp)
        p -= self.tmp


class Momentum(Optimizer):
    """v = momentum*v - lr*g; p += v"""

    name = "momentum"

    def __init__(self, lr: float = 0.01, momentum: float = 0.9) -> None:
        super().__init__(lr)
        self.momentum = _in_unit("momentum", momentum)

    def _allocate(self, p):
        self.v = np.zeros_like(p)

    def step(self, p, g):
        self._state(p)
        self.v *= self.momentum
        np.multiply(g, self.lr, out=self.tmp)
        self.v -= self.tmp
        p += self.v

    @property
    def hyperparameters(self):
        return {"lr": self.lr, "momentum": self.momentum}


class Nesterov(Momentum):
    """Nesterov momentum in the form of arXiv:1212.0901 (book's ``Nesterov``):
    p += momentum^2*v - (1+momentum)*lr*g; then v = momentum*v - lr*g."""

    name = "nesterov"

    def step(self, p, g):
        self._state(p)
        a = self.momentum
        np.multiply(g, self.lr, out=self.tmp)  # tmp = lr*g
        p += a * a * self.v  # uses the old v
        p -= (1 + a) * self.tmp
        self.v *= a
        self.v -= self.tmp


class AdaGrad(Optimizer):
    """h += g^2; p -= lr * g / (sqrt(h) + eps)"""

    name = "adagrad"

    def __init__(self, lr: float = 0.01, eps: float = EPS) -> None:
        super().__init__(lr)
        self.eps = _positive("eps", eps)

    def _allocate(self, p):
        self.h = np.zeros_like(p)

    def _scaled_step(self, p, g):
        # tmp = lr * g / (sqrt(h) + eps), computed in place
        np.sqrt(self.h, out=self.tmp)
        self.tmp += self.eps
        np.divide(g, self.tmp, out=self.tmp)
        self.tmp *= self.lr
        p -= self.tmp

    def step(self, p, g):
        self._state(p)
        self.h += g * g
        self._scaled_step(p, g)

    @property
    def hyperparameters(self):
        return {"lr": self.lr, "eps": self.eps}


class RMSprop(AdaGrad):
    """h = decay_rate*h + (1-decay_rate)*g^2; p -= lr * g / (sqrt(h) + eps)"""

    name = "rmsprop"

    def __init__(self, lr: float = 0.01, decay_rate: float = 0.99, eps: float = EPS) -> None:
        super().__init__(lr, eps)
        self.decay_rate = _in_unit("decay_rate", decay_rate)

    def step(self, p, g):
        self._state(p)
        self.h *= self.decay_rate
        np.multiply(g, g, out=self.tmp)
        self.tmp *= 1 - self.decay_rate
        self.h += self.tmp
        self._scaled_step(p, g)

    @property
    def hyperparameters(self):
        return {"lr": self.lr, "decay_rate": self.decay_rate, "eps": self.eps}


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) in the book's "efficient" form: bias correction folded into
    the step size, eps added to the uncorrected sqrt(v):
    t += 1; lr_t = lr*sqrt(1-beta2^t)/(1-beta1^t); m += (1-beta1)(g-m); v += (1-beta2)(g^2-v);
    p -= lr_t * m / (sqrt(v) + eps)

    The moments are stored without their (1-beta) factors, ``m_ = m/(1-beta1)`` and
    ``v_ = v/(1-beta2)``, so each is updated in two or three passes over memory instead of
    three or four (``m_ = beta1*m_ + g``, ``v_ = beta2*v_ + g^2``); the factors move into the
    step size and eps: p -= lr_t*(1-beta1)/sqrt(1-beta2) * m_ / (sqrt(v_) + eps/sqrt(1-beta2)).
    Ten passes per step in all; the same rule, rounded differently."""

    name = "adam"

    def __init__(
        self, lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999, eps: float = EPS
    ) -> None:
        super().__init__(lr)
        self.beta1 = _in_unit("beta1", beta1)
        self.beta2 = _in_unit("beta2", beta2)
        self.eps = _positive("eps", eps)
        self.t = 0

    def _allocate(self, p):
        self.m_ = np.zeros_like(p)  # m / (1-beta1)
        self.v_ = np.zeros_like(p)  # v / (1-beta2)
        self.t = 0

    def step(self, p, g):
        self._state(p)
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        # Python floats: a NumPy float64 scalar would turn the float32 updates below into
        # float64 loops with casting, several times slower
        lr_t = self.lr * math.sqrt(1.0 - b2**self.t) / (1.0 - b1**self.t)
        step_size = lr_t * (1.0 - b1) / math.sqrt(1.0 - b2)
        eps = self.eps / math.sqrt(1.0 - b2)
        m_, v_, tmp = self.m_, self.v_, self.tmp
        m_ *= b1  # m_ = b1*m_ + g
        m_ += g
        np.multiply(g, g, out=tmp)  # v_ = b2*v_ + g^2
        v_ *= b2
        v_ += tmp
        np.sqrt(v_, out=tmp)  # p -= step_size * m_ / (sqrt(v_) + eps)
        tmp += eps
        np.divide(m_, tmp, out=tmp)
        tmp *= step_size
        p -= tmp

    @property
    def hyperparameters(self):
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps}


OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.name: cls for cls in (SGD, Momentum, Nesterov, AdaGrad, RMSprop, Adam)
}


def make_optimizer(name: str, **hyperparameters: float) -> Optimizer:
    """Build an optimizer by name; unknown names and bad values raise ValueError."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}")
    try:
        return OPTIMIZERS[name](**hyperparameters)
    except TypeError as e:
        raise ValueError(f"bad hyperparameters for optimizer {name!r}: {e}") from None


@dataclass
class WeightDecay:
    """L2 weight decay as the book applies it: loss + 0.5*strength*sum(W^2) and
    grad + strength*W, on the first ``n_decayed`` entries (the weights) only."""

    strength: float = 0.0
    _scratch: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not (_is_number(self.strength) and np.isfinite(self.strength) and self.strength >= 0):
            raise ValueError(
                f"weight_decay.strength must be a finite number >= 0, got {self.strength!r}"
            )
        self.strength = float(self.strength)

    def penalty(self, p: np.ndarray, n_decayed: int) -> float:
        if not self.strength:
            return 0.0
        w = p[:n_decayed]
        return 0.5 * self.strength * float(np.dot(w, w))

    def apply(self, p: np.ndarray, g: np.ndarray, n_decayed: int) -> None:
        if not self.strength:
            return
        if self._scratch is None or self._scratch.size != n_decayed:
            self._scratch = np.empty_like(p[:n_decayed])
        np.multiply(p[:n_decayed], self.strength, out=self._scratch)
        g[:n_decayed] += self._scratch
