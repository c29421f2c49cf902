"""Gradient checks: backprop against central differences, in float64.

Two levels, as in CS231n:

* ``check_layer(layer, x)`` checks one layer through its vector-Jacobian product. With a
  random upstream gradient ``dout``, the scalar ``f = sum(layer.forward(x) * dout)`` has
  gradient ``layer.backward(dout)`` with respect to x and ``layer.grads[k]`` with respect to
  each parameter k, so one backward call is compared against central differences of f for
  dx *and* every parameter gradient. ``check_loss`` does the same for a loss layer.
* ``gradient_check(model, x, t)`` checks every parameter of a ``Sequential`` (``W1``, ``b1``,
  ``gamma1``, ``beta1``, ...) on the full training loss, optionally with weight decay.

The relative error of an analytic gradient ``a`` against a numerical one ``n`` (one array) is

    err = max|a - n| / max(max|a| + max|n|, floor * G)

where G is the largest ``|gradient entry|`` of the whole check (dx and every parameter of a
layer; every parameter of a model) and ``floor = 1e-3``; the maxima run over the entries
compared (all of them, or a random subset for a big model). Without the floor, a parameter whose
true gradient is zero (a bias followed by batch norm) would be judged on rounding noise alone
(err ~ 1); with it, such a parameter's error is its absolute error measured against a
thousandth of the check's largest gradient.

Central differences ``(f(p + h) - f(p - h)) / 2h`` have truncation error ~h^2 and rounding
error ~eps*|f|/h; in float64 they balance near eps**(1/3) ~ 6e-6, hence ``h = 1e-5``. Correct
layers then give errors around 1e-10; anything above ~1e-6 is a bug, or (rarely) a ReLU or
max-pool kink lying within h of the evaluated point. Such a kink is what an entry that
disagrees (error above 1e-8) is retried for: its central difference is recomputed with steps
h/10 and h/100 and the one closest to backprop is kept. A wrong backprop gradient disagrees
at every step, so the retry cannot hide it; a kink only spoils the steps that straddle it
(in a DeepConvNet with batch norm, two pooled values 7e-7 apart were enough to fail h=1e-5).

Dropout masks are frozen during a check (one training-mode forward draws them), batch norm
runs in training mode (so it needs a batch of at least 2), and BN running statistics and
dropout freeze flags are restored afterwards.

``python -m sweeps.gradcheck [--tol 1e-6] [hydra overrides]`` (console script
``sweeps-gradcheck``) builds a small float64 version of the configured model and prints each
parameter's error; it exits 1 if any exceeds ``--tol``. This module imports Hydra only inside
that command, so the library functions stay NumPy-only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from sweeps.nn import Sequential
from sweeps.nn import layers as L
from sweeps.optim import WeightDecay

if TYPE_CHECKING:
    from sweeps.config import RunConfig

H = 1e-5  # central-difference step, ~eps**(1/3) in float64
FLOOR = 1e-3  # errors are relative to at least FLOOR * (largest gradient entry of the check)
TOL = 1e-6  # the command's default pass threshold
KINK_RETRY = 1e-8  # entries whose error exceeds this are recomputed with steps h/10, h/100


def numerical_gradient(
    f: Callable[[], float], a: np.ndarray, h: float = H, index: np.ndarray | None = None
) -> np.ndarray:
    """Central differences of the scalar ``f()`` with respect to the entries of ``a``.

    ``a`` is perturbed in place (f must read it) and restored exactly. ``index`` selects flat
    entries (default: all); the result has one value per selected entry, shape ``a.shape``
    when all are taken. The step actually taken, ``(p + h) - (p - h)``, is used as the
    denominator, so the representation error of ``p + h`` does not enter.
    """
    if not a.flags.c_contiguous:
        raise ValueError("numerical_gradient needs a C-contiguous array to perturb in place")
    flat = a.reshape(-1)  # a view, since a is contiguous
    entries = np.arange(flat.size) if index is None else np.asarray(index)
    out = np.empty(entries.size, dtype=np.float64)
    for j, i in enumerate(entries):
        old = flat[i]
        up, down = old + h, old - h
        flat[i] = up
        f_up = f()
        flat[i] = down
        f_down = f()
        flat[i] = old
        out[j] = (f_up - f_down) / (up - down)
    return out.reshape(a.shape) if index is None else out


def rel_error(a: np.ndarray, n: np.ndarray, scale: float = 0.0) -> float:
    """``max|a - n| / max(max|a| + max|n|, scale)``, 0.0 when both are exactly zero."""
    a, n = np.asarray(a, dtype=np.float64), np.asarray(n, dtype=np.float64)
    if a.size == 0:
        return 0.0
    denominator = max(float(np.abs(a).max() + np.abs(n).max()), scale)
    diff = float(np.abs(a - n).max())
    return diff / denominator if denominator > 0 else diff


def _require_float64(arrays: dict[str, np.ndarray], what: str) -> None:
    for name, value in arrays.items():
        if value.dtype != np.float64:
            raise ValueError(
                f"gradient checks need float64; {what} {name!r} is {value.dtype} "
                "(build it with dtype=np.float64)"
            )


@contextmanager
def _training_state_kept(layers: Sequence[L.Layer]) -> Iterator[None]:
    """For the duration of a check: unfreeze dropout so that the check's first training
    forward draws fresh masks (``_freeze`` then fixes them); afterwards restore the dropout
    freeze flags and the BN running statistics that the check's forward passes moved."""
    dropouts = [layer for layer in layers if isinstance(layer, L.Dropout)]
    frozen = [layer.freeze_mask for layer in dropouts]
    running = [
        (layer, layer.running_mean.copy(), layer.running_var.copy())
        for layer in layers
        if isinstance(layer, L.BatchNorm)
    ]
    for layer in dropouts:
        layer.freeze_mask = False
    try:
        yield
    finally:
        for dropout, was_frozen in zip(dropouts, frozen, strict=True):
            dropout.freeze_mask = was_frozen
        for bn, mean, var in running:
            bn.running_mean[...] = mean
            bn.running_var[...] = var


def _freeze(layers: Sequence[L.Layer]) -> None:
    for layer in layers:  # every later forward reuses the masks just drawn
        if isinstance(layer, L.Dropout):
            layer.freeze_mask = True


def _select(a: np.ndarray, index: np.ndarray | None) -> np.ndarray:
    return a.reshape(-1) if index is None else a.reshape(-1)[index]


def _compare(
    f: Callable[[], float],
    arrays: dict[str, np.ndarray],
    analytic: dict[str, np.ndarray],
    index: dict[str, np.ndarray | None],
    h: float,
    floor: float,
) -> dict[str, float]:
    """Numerical gradients of f for each array (the selected entries), compared with the
    analytic ones; entries that disagree are retried at smaller steps (see KINK_RETRY)."""
    checked = {k: _select(a, index[k]) for k, a in analytic.items()}
    numerical = {k: numerical_gradient(f, arrays[k], h, index[k]).reshape(-1) for k in arrays}

    def largest() -> float:
        values = (*analytic.values(), *numerical.values())
        return max((float(np.abs(v).max()) for v in values if v.size), default=0.0)

    scale = floor * largest()
    for k, n in numerical.items():
        if not n.size:
            continue
        a = checked[k]
        denominator = max(float(np.abs(a).max() + np.abs(n).max()), scale)
        bad = np.flatnonzero(np.abs(a - n) > KINK_RETRY * denominator)
        idx = index[k]
        entries = bad if idx is None else idx[bad]
        for divisor in (10.0, 100.0):
            if not bad.size:
                break
            retry = numerical_gradient(f, arrays[k], h / divisor, entries)
            n[bad] = np.where(np.abs(a[bad] - retry) < np.abs(a[bad] - n[bad]), retry, n[bad])
    scale = floor * largest()
    return {k: rel_error(checked[k], numerical[k], scale) for k in analytic}


def check_layer(
    layer: L.Layer,
    x: np.ndarray,
    *,
    train: bool = True,
    h: float = H,
    floor: float = FLOOR,
    rng: np.random.Generator | None = None,
) -> dict[str, float]:
    """Relative errors of one layer's backward pass: key ``"x"`` for dx, then one key per
    parameter (``"W"``, ``"b"``, ``"gamma"``, ...).

    The layer's parameters and x must be float64 and C-contiguous. ``dout`` is drawn from
    ``rng`` (default: a fixed seed). Dropout masks are frozen after the first forward.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    _require_float64(layer.params, "parameter")
    x = np.array(x, dtype=np.float64, order="C")  # our own copy: it is perturbed in place
    with _training_state_kept([layer]):
        out = layer.forward(x, train)
        _freeze([layer])
        dout = rng.standard_normal(out.shape)
        analytic = {"x": np.array(layer.backward(dout.copy()), dtype=np.float64)}
        analytic.update({k: g.copy() for k, g in layer.grads.items()})

        def f() -> float:
            return float(np.vdot(layer.forward(x, train), dout))

        arrays = {"x": x, **layer.params}
        return _compare(f, arrays, analytic, dict.fromkeys(arrays), h, floor)


def check_loss(
    loss: L.SoftmaxCrossEntropy | L.MeanSquaredError,
    x: np.ndarray,
    t: np.ndarray,
    *,
    h: float = H,
) -> float:
    """Relative error of a loss layer's ``backward()`` (d loss / d x) against central
    differences of ``forward(x, t)``."""
    x = np.array(x, dtype=np.float64, order="C")
    loss.forward(x, t)
    analytic = {"x": np.array(loss.backward(), dtype=np.float64)}
    return _compare(lambda: loss.forward(x, t), {"x": x}, analytic, {"x": None}, h, FLOOR)["x"]


def gradient_check(
    model: Sequential,
    x: np.ndarray,
    t: np.ndarray,
    *,
    h: float = H,
    weight_decay: WeightDecay | None = None,
    max_entries: int | None = None,
    floor: float = FLOOR,
    rng: np.random.Generator | None = None,
) -> dict[str, float]:
    """Relative error of backprop against central differences of the training loss, per
    parameter name of ``model`` (W1, b1, gamma1, beta1, ...), in ``model.params`` order.

    The objective is ``model.loss(x, t, train=True)`` plus, if given, the weight-decay
    penalty ``0.5*strength*sum(W^2)``, whose gradient ``strength*W`` is added to the backprop
    gradient exactly as the trainer does. ``max_entries`` checks at most that many randomly
    chosen entries per parameter (drawn from ``rng``, default a fixed seed), for models too
    big to check entry by entry. Parameters are restored exactly; ``model.grads`` is left
    holding the backprop gradient.
    """
    if model.dtype != np.float64:
        raise ValueError(
            f"gradient checks need a float64 model, got {model.dtype} "
            "(build it with dtype=np.float64)"
        )
    if max_entries is not None and max_entries < 1:
        raise ValueError(f"max_entries must be None or >= 1, got {max_entries!r}")
    x = np.asarray(x, dtype=np.float64)
    if x.shape[0] < 2 and any(isinstance(layer, L.BatchNorm) for layer in model.layers):
        raise ValueError(
            f"batch norm in training mode needs a batch of at least 2 samples, got {x.shape[0]} "
            "(with one sample it outputs beta and the check is meaningless)"
        )
    rng = rng if rng is not None else np.random.default_rng(0)
    decay = weight_decay if weight_decay is not None else WeightDecay(0.0)
    p, g, n_decayed = model.flat_params, model.flat_grads, model.n_decayed

    def objective() -> float:
        return model.loss(x, t, train=True) + decay.penalty(p, n_decayed)

    with _training_state_kept(model.layers):
        model.loss(x, t, train=True)
        _freeze(model.layers)
        model.gradient(x, t)
        decay.apply(p, g, n_decayed)
        analytic = {name: grad.copy() for name, grad in model.grads.items()}
        index: dict[str, np.ndarray | None] = {}
        for name, param in model.params.items():
            if max_entries is not None and param.size > max_entries:
                index[name] = np.sort(rng.choice(param.size, max_entries, replace=False))
            else:
                index[name] = None
        return _compare(objective, model.params, analytic, index, h, floor)


# -- the command -------------------------------------------------------------------------------

MLP_INPUT: tuple[int, ...] = (12,)
# Any input of at least 4x4 survives DeepConvNet's three 2x2 pools; 28x28 is not needed.
DEEP_CNN_INPUT: tuple[int, ...] = (1, 6, 8)
DEEP_CNN_ENTRIES = 100


def small_config(cfg: RunConfig) -> tuple[RunConfig, tuple[int, ...]]:
    """A float64 copy of ``cfg`` with a small model of the same architecture, and a small
    input shape for it: MLP hidden layers of at most 6 units on 12 features; SimpleConvNet
    with at most 3 filters and 8 hidden units on a non-square image just big enough for its
    filter (10x12 for the book's 5x5); DeepConvNet (fixed channels) with 8 hidden units on
    6x8 images."""
    m = cfg.model
    shape: tuple[int, ...]
    if m.name == "mlp":
        m, shape = replace(m, hidden_sizes=[min(n, 6) for n in m.hidden_sizes]), MLP_INPUT
    elif m.name == "simple_cnn":
        m = replace(m, filters=min(m.filters, 3), hidden_size=min(m.hidden_size, 8))
        side = max(10, m.filter_size - 2 * m.pad + 2 * m.stride)  # conv output >= 2 for the pool
        shape = (1, side, side + 2)
    else:
        m, shape = replace(m, hidden_size=min(m.hidden_size, 8)), DEEP_CNN_INPUT
    return replace(cfg, model=m, dtype="float64"), shape


def jitter_offsets(model: Sequential, rng: np.random.Generator) -> None:
    """Replace the initial biases and BN shifts (all 0) by N(0, 0.1^2) and BN scales (all 1)
    by U(0.5, 1.5). With zero biases, a sample whose previous layer is entirely dead sits
    exactly on a ReLU kink, where no finite difference agrees with backprop; and gamma = 1,
    beta = 0 could hide a mixed-up gamma/beta gradient."""
    for name, value in model.params.items():
        if name.startswith("gamma"):
            value[...] = rng.uniform(0.5, 1.5, value.shape)
        elif name.startswith("b"):  # b1, beta1, ...
            value[...] = rng.normal(0.0, 0.1, value.shape)


def _entries(text: str) -> int:
    """'all' -> 0 (every entry), else an integer >= 1."""
    if text == "all":
        return 0
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 'all' or an integer >= 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweeps-gradcheck",
        description="Check backprop against central differences on a small float64 version "
        "of the configured model (Hydra overrides as for sweeps.run, e.g. model=mlp "
        "batchnorm=on dropout=on).",
    )
    parser.add_argument("--tol", type=float, default=TOL, help="fail above this relative error")
    parser.add_argument("--h", type=float, default=H, help="central-difference step")
    parser.add_argument("--batch", type=int, default=4, help="samples in the check batch")
    parser.add_argument(
        "--entries",
        type=_entries,
        default=None,
        help="entries checked per parameter: an integer or 'all' "
        f"(default: all, but {DEEP_CNN_ENTRIES} random ones for deep_cnn)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=simple_cnn")
    return parser


def _compose(overrides: Sequence[str]) -> RunConfig:
    from sweeps.config import load

    return load(overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; return 0 if every parameter is within ``--tol``, 1 if not, 2 on a
    configuration error."""
    args = _parser().parse_intermixed_args(argv)
    if args.batch < 1:
        print(f"--batch must be >= 1, got {args.batch}", file=sys.stderr)
        return 2
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from threadpoolctl import threadpool_limits

    from sweeps.config import choices_from_config
    from sweeps.experiment import build_model

    try:
        cfg = _compose(args.overrides)
    except (ValueError, HydraException, OmegaConfBaseException) as e:
        print(f"sweeps-gradcheck: bad configuration: {e}", file=sys.stderr)
        return 2
    cfg, shape = small_config(cfg)
    if args.entries is None:  # the default: all entries, except for the big deep_cnn
        entries = DEEP_CNN_ENTRIES if cfg.model.name == "deep_cnn" else None
    else:
        entries = args.entries or None  # 0: 'all'
    rng = np.random.default_rng(cfg.seed)
    model = build_model(cfg, rng, shape)
    jitter_offsets(model, rng)
    x = rng.standard_normal((args.batch, *shape))
    t = rng.integers(0, 10, args.batch)
    decay = cfg.weight_decay.build()
    with threadpool_limits(limits=1):  # tiny matrices: BLAS threads only add overhead
        errors = gradient_check(
            model, x, t, h=args.h, weight_decay=decay, max_entries=entries, rng=rng
        )

    choices = " ".join(f"{k}={v}" for k, v in choices_from_config(cfg).items() if k != "data")
    print(f"gradient check: {choices}")
    print(
        f"float64, input {shape}, batch {args.batch}, h={args.h:g}, tol={args.tol:g}, "
        f"weight decay {decay.strength:g}, {model.flat_params.size} parameters"
    )
    print(f"{'param':<8} {'shape':<16} {'checked':>7} {'max|grad|':>10} {'rel error':>10}")
    failed = []
    for name, err in errors.items():
        param = model.params[name]
        checked = param.size if entries is None else min(entries, param.size)
        ok = err <= args.tol
        if not ok:
            failed.append(name)
        largest = float(np.abs(model.grads[name]).max())
        print(
            f"{name:<8} {str(param.shape):<16} {checked:>7} {largest:>10.2e} {err:>10.2e}  "
            f"{'ok' if ok else 'FAIL'}"
        )
    worst = max(errors.values(), default=0.0)
    if failed:
        print(f"FAILED: {', '.join(failed)} above tol {args.tol:g} (max {worst:.2e})")
        return 1
    print(f"ok: all {len(errors)} parameters within tol {args.tol:g} (max {worst:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
