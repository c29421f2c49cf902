"""Optimizers against hand-computed steps, the in-place contract, argument checking, and
weight decay as a gradient transform.

The expected numbers below were worked out by hand from the book's formulas (and re-checked
with scalar Python arithmetic), not by running sweeps.optim.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sweeps.nn import mlp, simple_convnet
from sweeps.optim import OPTIMIZERS, WeightDecay, make_optimizer
from sweeps.train import TrainSettings, fit

P0 = [1.0, -2.0]
G1 = [0.5, -1.0]
G2 = [-0.2, 0.3]

# name, hyperparameters, p after step 1, p after step 2
HAND_COMPUTED = [
    # p -= lr*g:  1 - 0.1*0.5 = 0.95;  0.95 - 0.1*(-0.2) = 0.97
    ("sgd", {"lr": 0.1}, [0.95, -1.9], [0.97, -1.93]),
    # v = 0.9v - 0.1g; p += v:  v1 = (-0.05, 0.1)
    #   v2 = (-0.045 + 0.02, 0.09 - 0.03) = (-0.025, 0.06)
    ("momentum", {"lr": 0.1, "momentum": 0.9}, [0.95, -1.9], [0.925, -1.84]),
    # p += 0.81v - 1.9*0.1*g, then v = 0.9v - 0.1g:
    #   p1 = 1 - 0.19*0.5 = 0.905;  p2 = 0.905 + 0.81*(-0.05) - 0.19*(-0.2) = 0.9025
    ("nesterov", {"lr": 0.1, "momentum": 0.9}, [0.905, -1.81], [0.9025, -1.786]),
    # h += g^2; p -= 0.1g/(sqrt(h) + 1e-7):
    #   p1 = 1 - 0.05/0.5000001;  h2 = 0.29, p2 = p1 + 0.02/(sqrt(0.29) + 1e-7)
    (
        "adagrad",
        {"lr": 0.1},
        [0.900000019999996, -1.900000009999999],
        [0.937139080738856, -1.92873479580434],
    ),
    # h = 0.9h + 0.1g^2; p -= 0.1g/(sqrt(h) + 1e-7):
    #   h1 = 0.025, p1 = 1 - 0.05/(0.158113883 + 1e-7);  h2 = 0.0225 + 0.004 = 0.0265
    (
        "rmsprop",
        {"lr": 0.1, "decay_rate": 0.9},
        [0.683772433983036, -1.68377233398313],
        [0.806631381878174, -1.77911856260467],
    ),
    # lr_t = 0.1*sqrt(1 - 0.999^t)/(1 - 0.9^t); m += 0.1(g - m); v += 0.001(g^2 - v);
    # p -= lr_t*m/(sqrt(v) + 1e-7):  t=1: lr_t = 0.0316227766, m = 0.05, v = 2.5e-4
    (
        "adam",
        {"lr": 0.1, "beta1": 0.9, "beta2": 0.999},
        [0.900000632451532, -1.900000316226766],
        [0.865440250693356, -1.857215586727016],
    ),
]


@pytest.mark.parametrize(
    ("name", "hp", "step1", "step2"), HAND_COMPUTED, ids=[c[0] for c in HAND_COMPUTED]
)
def test_two_steps_match_hand_computation(name, hp, step1, step2):
    opt = make_optimizer(name, **hp)
    p = np.array(P0)
    opt.step(p, np.array(G1))
    np.testing.assert_allclose(p, step1, rtol=1e-13)
    opt.step(p, np.array(G2))
    np.testing.assert_allclose(p, step2, rtol=1e-13)


def test_every_optimizer_is_covered():
    assert {c[0] for c in HAND_COMPUTED} == set(OPTIMIZERS)


def test_book_defaults():
    assert make_optimizer("sgd").hyperparameters == {"lr": 0.01}
    assert make_optimizer("momentum").hyperparameters == {"lr": 0.01, "momentum": 0.9}
    assert make_optimizer("rmsprop").hyperparameters["decay_rate"] == 0.99
    assert make_optimizer("adam").hyperparameters == {
        "lr": 0.001,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-7,
    }


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_updates_in_place_and_keeps_model_views(name):
    rng = np.random.default_rng(0)
    model = simple_convnet(rng=rng, input_shape=(1, 8, 8), filters=2, hidden_size=4, batchnorm=True)
    flat, views = model.flat_params, dict(model.params)
    before = flat.copy()
    x, t = rng.standard_normal((3, 1, 8, 8)), rng.integers(0, 10, 3)
    opt = make_optimizer(name)
    for _ in range(2):
        model.gradient(x, t)
        opt.step(model.flat_params, model.flat_grads)
    assert model.flat_params is flat
    assert not np.array_equal(flat, before)
    for key, view in model.params.items():
        assert view is views[key]
        assert np.shares_memory(view, flat)
    for layer in model.layers:
        for key, value in layer.params.items():
            assert np.shares_memory(value, flat), (layer, key)


def test_fit_keeps_parameters_as_views_of_the_flat_buffer():
    rng = np.random.default_rng(1)
    model = mlp(4, [5], 3, rng=rng, batchnorm=True)
    flat = model.flat_params
    x, t = rng.standard_normal((20, 4)).astype(np.float32), rng.integers(0, 3, 20)
    fit(model, make_optimizer("adam"), (x, t), None, TrainSettings(epochs=2, batch_size=5), rng)
    assert model.flat_params is flat
    assert all(np.shares_memory(v, flat) for v in model.params.values())


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("lr", [0.0, -0.1, math.nan, math.inf])
def test_bad_learning_rate_is_rejected(name, lr):
    with pytest.raises(ValueError, match=rf"lr .*{lr!r}"):
        make_optimizer(name, lr=lr)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("lr", [True, "0.01", None])
def test_a_learning_rate_that_is_not_a_number_is_rejected(name, lr):
    with pytest.raises(ValueError, match=rf"lr must be a finite number > 0, got {lr!r}"):
        make_optimizer(name, lr=lr)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_numpy_numbers_are_accepted_and_kept_as_python_floats(name):
    opt = make_optimizer(
        name,
        lr=np.float32(0.5),
        **({"momentum": np.float64(0.5)} if name in ("momentum", "nesterov") else {}),
    )
    assert opt.lr == 0.5 and type(opt.lr) is float
    p, g = np.ones(3, np.float32), np.ones(3, np.float32)
    opt.step(p, g)
    assert p.dtype == np.float32 and np.all(p < 1)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("momentum", "momentum"),
        ("nesterov", "momentum"),
        ("rmsprop", "decay_rate"),
        ("adam", "beta1"),
        ("adam", "beta2"),
    ],
)
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, math.nan])
def test_rates_outside_unit_interval_are_rejected(name, key, value):
    with pytest.raises(ValueError, match=rf"{key} .*{value!r}"):
        make_optimizer(name, **{key: value})


def test_unknown_optimizer_lists_the_choices():
    with pytest.raises(ValueError, match="adamm") as info:
        make_optimizer("adamm")
    for choice in ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"):
        assert choice in str(info.value)


def test_unknown_hyperparameter_is_a_value_error():
    with pytest.raises(ValueError, match="sgd"):
        make_optimizer("sgd", momentum=0.9)


def test_state_is_kept_between_steps_and_sized_on_first_use():
    opt = make_optimizer("momentum", lr=0.1, momentum=0.5)
    p = np.zeros(3)
    opt.step(p, np.ones(3))  # v = -0.1, p = -0.1
    opt.step(p, np.zeros(3))  # v = -0.05, p = -0.15
    np.testing.assert_allclose(p, -0.15, rtol=1e-14)


# -- weight decay ----------------------------------------------------------------------------


def bn_model():
    return mlp(4, [5, 3], 2, rng=np.random.default_rng(2), batchnorm=True, dtype=np.float64)


def test_weight_decay_gradient_touches_weights_only():
    model = bn_model()
    for v in model.params.values():  # non-zero everywhere, so a wrongly decayed bias would show
        v += 0.5
    model.flat_grads[...] = 1.0
    WeightDecay(0.1).apply(model.flat_params, model.flat_grads, model.n_decayed)
    for name, grad in model.grads.items():
        if name.startswith("W"):
            np.testing.assert_allclose(grad, 1.0 + 0.1 * model.params[name], rtol=1e-15)
        else:  # b, gamma, beta
            np.testing.assert_array_equal(grad, 1.0)


def test_weight_decay_penalty_value():
    model = bn_model()
    weights = [model.params[k] for k in ("W1", "W2", "W3")]
    expected = 0.5 * 0.1 * sum(float(np.sum(w * w)) for w in weights)
    assert WeightDecay(0.1).penalty(model.flat_params, model.n_decayed) == pytest.approx(
        expected, rel=1e-13
    )
    assert WeightDecay(0.0).penalty(model.flat_params, model.n_decayed) == 0.0


def test_weight_decay_off_is_a_no_op():
    model = bn_model()
    grads = model.flat_grads.copy()
    WeightDecay(0.0).apply(model.flat_params, model.flat_grads, model.n_decayed)
    np.testing.assert_array_equal(model.flat_grads, grads)


@pytest.mark.parametrize("strength", [-0.1, "0.1", True, math.inf, math.nan])
def test_weight_decay_rejects_bad_strength(strength):
    with pytest.raises(ValueError, match="strength"):
        WeightDecay(strength)
