"""Whole-model gradient checks (backprop against central differences of the full loss, in
float64) for every model family and training trick, and the ``sweeps-gradcheck`` command."""

from __future__ import annotations

import numpy as np
import pytest

from sweeps import gradcheck
from sweeps.gradcheck import gradient_check, jitter_offsets, numerical_gradient, rel_error
from sweeps.nn import Sequential, deep_convnet, mlp, simple_convnet
from sweeps.nn import layers as L
from sweeps.optim import WeightDecay

TOL = 1e-6


def data(rng: np.random.Generator, n: int, shape: tuple[int, ...], classes: int = 10):
    return rng.standard_normal((n, *shape)), rng.integers(0, classes, n)


def assert_all_small(model: Sequential, errors: dict[str, float]) -> None:
    assert list(errors) == list(model.params)  # W1, ..., b1, gamma1, beta1, ...
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


def small_mlp(rng, **kw) -> Sequential:
    """6 -> 5 -> 4 -> 3 classes in float64, biases jittered off the ReLU kinks."""
    model = mlp(6, [5, 4], 3, rng=rng, dtype=np.float64, **kw)
    jitter_offsets(model, rng)
    return model


# -- the building blocks ---------------------------------------------------------------------


def test_numerical_gradient_of_a_known_function():
    a = np.array([[0.5, -1.0, 2.0], [3.0, -0.25, 1.5]])
    before = a.copy()
    g = numerical_gradient(lambda: float(np.sum(a**3)), a)
    np.testing.assert_allclose(g, 3 * before**2, rtol=1e-9)
    np.testing.assert_array_equal(a, before)  # restored exactly
    some = numerical_gradient(lambda: float(np.sum(a**3)), a, index=np.array([1, 4]))
    np.testing.assert_allclose(some, 3 * before.reshape(-1)[[1, 4]] ** 2, rtol=1e-9)


def test_numerical_gradient_refuses_non_contiguous_arrays():
    a = np.zeros((4, 4))[:, ::2]
    with pytest.raises(ValueError, match="contiguous"):
        numerical_gradient(lambda: 0.0, a)


def test_rel_error_formula():
    a, n = np.array([1.0, -2.0]), np.array([1.0, -2.5])
    assert rel_error(a, n) == pytest.approx(0.5 / (2.0 + 2.5))
    assert rel_error(np.zeros(3), np.zeros(3)) == 0.0
    assert rel_error(np.zeros(3), np.full(3, 1e-12), scale=1e-3) == pytest.approx(1e-9)


# -- MLPs: activations, batch norm, dropout, weight decay, MSE -------------------------------


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_mlp_each_activation(activation):
    rng = np.random.default_rng(1)
    model = small_mlp(rng, activation=activation)
    assert_all_small(model, gradient_check(model, *data(rng, 4, (6,), 3)))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_mlp_with_batchnorm(activation):
    rng = np.random.default_rng(2)
    model = small_mlp(rng, activation=activation, batchnorm=True)
    assert {"gamma1", "beta1", "gamma2", "beta2"} <= set(model.params)
    running = [
        (layer.running_mean.copy(), layer.running_var.copy())
        for layer in model.layers
        if isinstance(layer, L.BatchNorm)
    ]
    params = model.flat_params.copy()
    errors = gradient_check(model, *data(rng, 5, (6,), 3))
    assert_all_small(model, errors)
    # b1 and b2 feed batch norm: their true gradient is zero, and backprop agrees
    assert np.abs(model.grads["b1"]).max() < 1e-12
    # the check leaves the parameters and the running statistics as they were
    np.testing.assert_array_equal(model.flat_params, params)
    after = [
        (layer.running_mean, layer.running_var)
        for layer in model.layers
        if isinstance(layer, L.BatchNorm)
    ]
    for (m0, v0), (m1, v1) in zip(running, after, strict=True):
        np.testing.assert_array_equal(m0, m1)
        np.testing.assert_array_equal(v0, v1)


@pytest.mark.parametrize("inverted", [True, False], ids=["inverted", "book"])
def test_mlp_with_dropout(inverted):
    rng = np.random.default_rng(3)
    model = small_mlp(rng, dropout=0.3, dropout_inverted=inverted, batchnorm=True)
    assert_all_small(model, gradient_check(model, *data(rng, 4, (6,), 3)))
    assert not any(layer.freeze_mask for layer in model.layers if isinstance(layer, L.Dropout))


def test_mlp_with_weight_decay_checks_the_decayed_objective():
    rng = np.random.default_rng(4)
    model = small_mlp(rng, batchnorm=True)
    x, t = data(rng, 4, (6,), 3)
    decay = WeightDecay(0.3)
    assert_all_small(model, gradient_check(model, x, t, weight_decay=decay))
    # model.grads now holds backprop + 0.3*W for the weights, plain backprop elsewhere
    decayed = {k: v.copy() for k, v in model.grads.items()}
    gradient_check(model, x, t)
    for name in model.params:
        extra = 0.3 * model.params[name] if name.startswith("W") else 0.0
        np.testing.assert_allclose(decayed[name], model.grads[name] + extra, rtol=1e-12, atol=1e-15)


def test_weight_decay_mismatch_is_caught():
    """Decaying only one side of the comparison must fail: the check sees the penalty."""
    rng = np.random.default_rng(5)
    model = small_mlp(rng)
    x, t = data(rng, 4, (6,), 3)

    class GradientOnly(WeightDecay):
        def penalty(self, p, n_decayed):
            return 0.0

    errors = gradient_check(model, x, t, weight_decay=GradientOnly(0.3))
    assert all(errors[k] > 1e-3 for k in ("W1", "W2", "W3"))
    assert all(errors[k] < TOL for k in ("b1", "b2", "b3"))


def test_mse_with_sigmoid_output():
    rng = np.random.default_rng(6)
    model = small_mlp(
        rng, activation="sigmoid", output_activation="sigmoid", loss="mse", mse_targets=(0.01, 0.99)
    )
    assert isinstance(model.layers[-1], L.Sigmoid)
    assert_all_small(model, gradient_check(model, *data(rng, 4, (6,), 3)))


def test_mlp_without_bias():
    rng = np.random.default_rng(7)
    model = mlp(6, [5], 3, rng=rng, bias=False, activation="tanh", dtype=np.float64)
    assert list(model.params) == ["W1", "W2"]
    assert_all_small(model, gradient_check(model, *data(rng, 3, (6,), 3)))


# -- ConvNets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"batchnorm": True, "dropout": 0.3},
        {"filter_size": 3, "stride": 2, "pad": 1, "activation": "tanh"},
    ],
    ids=["book", "bn-dropout", "stride2-pad1"],
)
def test_simple_convnet(kw):
    """The book's ch07 check uses a 1x10x10 input; a non-square one also catches mixed-up axes."""
    rng = np.random.default_rng(8)
    model = simple_convnet(
        rng=rng,
        input_shape=(1, 10, 12),
        filters=3,
        hidden_size=6,
        dtype=np.float64,
        init=None,
        **kw,
    )
    jitter_offsets(model, rng)
    assert_all_small(model, gradient_check(model, *data(rng, 3, (1, 10, 12))))


def test_deep_convnet_on_a_small_input():
    """DeepConvNet's channels are fixed (72k parameters), so 10 random entries per
    parameter are checked; 4x6 images pass its three 2x2 pools (no need for 28x28)."""
    rng = np.random.default_rng(9)
    model = deep_convnet(
        rng=rng, input_shape=(1, 4, 6), hidden_size=6, dtype=np.float64, batchnorm=True, dropout=0.5
    )
    jitter_offsets(model, rng)
    assert [f"W{i}" for i in range(1, 9)] == [k for k in model.params if k.startswith("W")]
    errors = gradient_check(model, *data(rng, 2, (1, 4, 6)), max_entries=10, rng=rng)
    assert_all_small(model, errors)


# -- failures the check must report ----------------------------------------------------------


def test_a_wrong_backward_is_reported(monkeypatch):
    rng = np.random.default_rng(10)
    model = small_mlp(rng, activation="tanh")
    x, t = data(rng, 4, (6,), 3)
    # d tanh = 1 - out**2; forgetting the square is a plausible slip
    monkeypatch.setattr(L.Tanh, "backward", lambda self, dout: dout * (1.0 - self.out))
    errors = gradient_check(model, x, t)
    assert errors["W1"] > 1e-2 and errors["b2"] > 1e-2
    assert errors["W3"] < TOL and errors["b3"] < TOL  # the output layer is upstream of no tanh


def test_a_kink_within_h_is_retried_at_smaller_steps():
    """A ReLU input 3e-7 from zero: the h=1e-5 central difference straddles the kink, but
    a wrong backward would disagree at every step, so the retry at h/100 is sound."""
    model = mlp(2, [2], 2, rng=np.random.default_rng(0), dtype=np.float64)
    model.params["W1"][...] = [[1.0, -0.5], [0.5, 1.0]]
    model.params["b1"][...] = [3e-7, 0.2]  # sample 0 = (0, 0): unit 0 sits 3e-7 above 0
    model.params["W2"][...] = [[1.0, -1.0], [0.5, 0.3]]
    x, t = np.array([[0.0, 0.0], [1.0, 2.0]]), np.array([0, 1])
    assert_all_small(model, gradient_check(model, x, t))
    plain = numerical_gradient(lambda: model.loss(x, t), model.params["b1"])
    model.gradient(x, t)
    assert abs(plain[0] - model.grads["b1"][0]) > 1e-3  # the plain h=1e-5 estimate is off


def test_gradient_check_refuses_float32_and_bn_with_one_sample():
    rng = np.random.default_rng(11)
    with pytest.raises(ValueError, match="float64"):
        gradient_check(mlp(4, [3], 2, rng=rng), *data(rng, 2, (4,), 2))
    model = mlp(4, [3], 2, rng=rng, batchnorm=True, dtype=np.float64)
    with pytest.raises(ValueError, match="at least 2"):
        gradient_check(model, *data(rng, 1, (4,), 2))


# -- the command -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=mlp", "batchnorm=on", "dropout=on"],
        [
            "model=mlp",
            "activation=sigmoid",
            "weight_decay=l2",
            "model.loss=mse",
            "model.output_activation=sigmoid",
        ],
        ["model=simple_cnn", "batchnorm=on", "activation=tanh"],
        ["model=deep_cnn", "dropout=on", "--entries", "8"],
    ],
    ids=["mlp-bn-dropout", "mlp-mse-decay", "simple_cnn-bn", "deep_cnn"],
)
def test_command_passes_and_prints_every_parameter(capsys, overrides):
    assert gradcheck.main(overrides) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    model_name = overrides[0].split("=")[1]
    expected = {
        "mlp": ["W1", "W2", "W3", "W4", "W5", "b1", "b5"],
        "simple_cnn": ["W1", "W2", "W3", "b1", "gamma1", "beta1", "gamma2", "beta2", "b3"],
        "deep_cnn": [f"W{i}" for i in range(1, 9)] + [f"b{i}" for i in range(1, 9)],
    }[model_name]
    if "batchnorm=on" in overrides and model_name == "mlp":
        expected += ["gamma1", "beta1", "gamma4", "beta4"]
    for name in expected:
        assert name in lines and lines[name].rstrip().endswith("ok"), out
    assert "float64" in out and out.rstrip().splitlines()[-1].startswith("ok")


def test_command_fails_above_the_threshold(capsys):
    assert gradcheck.main(["--tol", "1e-14", "model=mlp"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and out.rstrip().splitlines()[-1].startswith("FAILED")


def test_command_fails_on_a_broken_layer(capsys, monkeypatch):
    monkeypatch.setattr(L.Sigmoid, "backward", lambda self, dout: dout * self.out)
    assert gradcheck.main(["activation=sigmoid", "--tol=1e-6"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_command_rejects_a_bad_configuration(capsys):
    assert gradcheck.main(["model=nope"]) == 2
    assert gradcheck.main(["optimizer.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert "model/nope" in err and "lr" in err and "-1" in err


def test_small_config_shrinks_the_model(run_cfg):
    cfg, shape = gradcheck.small_config(run_cfg(["model=simple_cnn", "dtype=float32"]))
    assert cfg.dtype == "float64" and shape == (1, 10, 12)
    assert cfg.model.filters <= 3 and cfg.model.hidden_size <= 8
    cfg, shape = gradcheck.small_config(run_cfg(["model=mlp"]))
    assert shape == gradcheck.MLP_INPUT and max(cfg.model.hidden_sizes) <= 6
    assert len(cfg.model.hidden_sizes) == 4  # same depth as configured
