"""Model builders and Sequential: the book's architectures and parameter counts, the flat
parameter buffer, argument errors, state dicts, and the engine's import hygiene."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from sweeps.config import MLPConf
from sweeps.nn import Sequential, deep_convnet, mlp, simple_convnet
from sweeps.nn import layers as L


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def layer_types(model: Sequential) -> list[str]:
    return [type(layer).__name__ for layer in model.layers]


# -- the book's models -----------------------------------------------------------------------


def test_simple_convnet_matches_the_book():
    model = simple_convnet(rng=rng())
    assert model.flat_params.size == 433_890
    assert layer_types(model) == [
        "Convolution", "ReLU", "MaxPooling", "Flatten", "Affine", "ReLU", "Affine",
    ]  # fmt: skip
    assert model.params["W1"].shape == (30, 1, 5, 5)
    assert model.params["W2"].shape == (4320, 100)  # 30 * 12 * 12
    assert model.params["W3"].shape == (100, 10)
    assert model.params["W1"].std() == pytest.approx(0.01, rel=0.1)  # the book's std 0.01
    assert isinstance(model.loss_layer, L.SoftmaxCrossEntropy)


def test_deep_convnet_matches_the_book():
    model = deep_convnet(rng=rng())
    assert model.flat_params.size == 123_552
    conv, act, pool = "Convolution", "ReLU", "MaxPooling"
    assert layer_types(model) == [
        conv, act, conv, act, pool,
        conv, act, conv, act, pool,
        conv, act, conv, act, pool,
        "Flatten", "Affine", act, "Dropout", "Affine", "Dropout",
    ]  # fmt: skip
    convs = [layer for layer in model.layers if isinstance(layer, L.Convolution)]
    assert [c.params["W"].shape[0] for c in convs] == [16, 16, 32, 32, 64, 64]
    assert [c.pad for c in convs] == [1, 1, 1, 2, 1, 1]
    assert model.params["W7"].shape == (1024, 50)  # 64 * 4 * 4
    assert model.forward(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 10)


def test_mlp_layer_order_with_batchnorm_and_dropout():
    model = mlp(4, [5, 3], 2, rng=rng(), batchnorm=True, dropout=0.5)
    assert layer_types(model) == [
        "Affine", "BatchNorm", "ReLU", "Dropout",
        "Affine", "BatchNorm", "ReLU", "Dropout",
        "Affine",
    ]  # fmt: skip
    assert model.hidden == [2, 6]
    assert model.activation_names() == ["relu", "relu"]
    assert list(model.params) == [
        "W1", "W2", "W3", "b1", "gamma1", "beta1", "b2", "gamma2", "beta2", "b3",
    ]  # fmt: skip
    assert [d.inverted for d in model.layers if isinstance(d, L.Dropout)] == [True, True]
    book = mlp(4, [5], 2, rng=rng(), dropout=0.2, dropout_inverted=False)
    assert [d.inverted for d in book.layers if isinstance(d, L.Dropout)] == [False]


def test_mlp_output_activation_and_mse():
    model = mlp(4, [3], 2, rng=rng(), activation="tanh", output_activation="sigmoid", loss="mse")
    assert layer_types(model) == ["Affine", "Tanh", "Affine", "Sigmoid"]
    assert isinstance(model.loss_layer, L.MeanSquaredError)


def test_dropout_zero_adds_no_layer():
    assert "Dropout" not in layer_types(mlp(4, [3], 2, rng=rng(), dropout=0.0))


# -- the flat buffer -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: mlp(4, [5, 3], 2, rng=rng(), batchnorm=True, dropout=0.5),
        lambda: simple_convnet(
            rng=rng(), input_shape=(1, 8, 8), filters=2, hidden_size=4, batchnorm=True
        ),
        lambda: deep_convnet(rng=rng(), input_shape=(1, 8, 8), hidden_size=4),
    ],
    ids=["mlp", "simple_cnn", "deep_cnn"],
)
def test_decayed_weights_come_first_in_the_flat_buffer(build):
    model = build()
    names = list(model.params)
    weights = [k for k in names if k.startswith("W")]
    assert names[: len(weights)] == weights  # W1, W2, ... then biases and BN parameters
    assert model.n_decayed == sum(model.params[k].size for k in weights)
    np.testing.assert_array_equal(
        model.decayed_params, np.concatenate([model.params[k].ravel() for k in weights])
    )
    for name, value in model.params.items():
        assert np.shares_memory(value, model.flat_params)
        assert np.shares_memory(model.grads[name], model.flat_grads)
        assert model.grads[name].shape == value.shape
        assert np.shares_memory(value, model.decayed_params) == name.startswith("W")
    assert sum(v.size for v in model.params.values()) == model.flat_params.size


def test_gradient_lands_in_the_flat_grads():
    model = mlp(4, [3], 2, rng=rng(), dtype=np.float64)
    model.gradient(np.ones((2, 4)), np.array([0, 1]))
    layer_grads = np.concatenate(
        [model.layers[0].grads["W"].ravel(), model.layers[2].grads["W"].ravel()]
    )
    np.testing.assert_array_equal(model.flat_grads[: model.n_decayed], layer_grads)
    assert np.any(model.flat_grads)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_runs_through(dtype):
    model = mlp(4, [3], 2, rng=rng(), dtype=dtype, batchnorm=True)
    assert model.flat_params.dtype == dtype
    assert all(v.dtype == dtype for v in model.params.values())
    assert model.forward(np.ones((2, 4))).dtype == dtype


# -- argument errors -------------------------------------------------------------------------


def test_input_shape_mismatch():
    model = mlp(4, [3], 2, rng=rng())
    with pytest.raises(ValueError, match=r"\(5,\).*\(4,\)"):
        model.forward(np.zeros((2, 5)))
    cnn = simple_convnet(rng=rng(), input_shape=(1, 10, 10), filters=2, hidden_size=3)
    with pytest.raises(ValueError, match=r"\(1, 10, 12\)"):
        cnn.loss(np.zeros((2, 1, 10, 12)), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"\(784,\)"):
        cnn.evaluate(np.zeros((2, 784)), np.array([0, 1]))


@pytest.mark.parametrize(
    ("input_size", "hidden", "output_size"),
    [(0, [5], 3), (4, [0], 3), (4, [5, -2], 3), (4, [5], 0), (4, [2.5], 3)],
)
def test_non_positive_layer_sizes(input_size, hidden, output_size):
    with pytest.raises(ValueError, match="layer sizes"):
        mlp(input_size, hidden, output_size, rng=rng())


def test_empty_hidden_sizes_rejected_by_the_config():
    with pytest.raises(ValueError, match="hidden_sizes"):
        MLPConf(hidden_sizes=[])
    with pytest.raises(ValueError, match="hidden_sizes"):
        MLPConf(hidden_sizes=[100, 0])


def test_inputs_too_small_for_the_convnets():
    with pytest.raises(ValueError, match="too small"):
        simple_convnet(rng=rng(), input_shape=(1, 5, 5))
    with pytest.raises(ValueError, match="too small"):
        deep_convnet(rng=rng(), input_shape=(1, 3, 3))
    deep_convnet(rng=rng(), input_shape=(1, 4, 4), hidden_size=2)  # the smallest that works


@pytest.mark.parametrize(
    "build",
    [
        lambda **kw: mlp(4, [3], 2, rng=rng(), **kw),
        lambda **kw: simple_convnet(rng=rng(), input_shape=(1, 8, 8), **kw),
        lambda **kw: deep_convnet(rng=rng(), **kw),
    ],
    ids=["mlp", "simple_cnn", "deep_cnn"],
)
def test_unknown_activation_and_bad_dropout(build):
    with pytest.raises(ValueError, match="'gelu'") as info:
        build(activation="gelu")
    assert all(name in str(info.value) for name in ("relu", "sigmoid", "tanh"))
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            build(dropout=ratio)


def test_unknown_loss_and_output_activation():
    with pytest.raises(ValueError, match="'hinge'.*mse"):
        mlp(4, [3], 2, rng=rng(), loss="hinge")
    with pytest.raises(ValueError, match="'softmax'"):
        mlp(4, [3], 2, rng=rng(), output_activation="softmax")


# -- evaluation and state --------------------------------------------------------------------


def test_evaluate_and_predict_agree():
    r = rng(3)
    model = mlp(6, [8], 4, rng=r, dtype=np.float64)
    x, t = r.standard_normal((25, 6)), r.integers(0, 4, 25)
    loss, acc = model.evaluate(x, t, batch_size=7)
    assert acc == pytest.approx(np.mean(model.predict(x, batch_size=7) == t))
    assert loss == pytest.approx(model.loss(x, t, train=False), rel=1e-12)


def test_a_convnet_evaluates_in_chunks_whose_arrays_fit_the_cache(monkeypatch):
    from sweeps.nn import model as M

    r = rng(4)
    cnn = simple_convnet(rng=r, dtype=np.float64)
    # the conv output, 30 x 24 x 24 float64 per sample, is the largest array
    assert cnn.eval_chunk(1000) == M.EVAL_CHUNK_BYTES // (30 * 24 * 24 * 8) < 1000
    assert mlp(784, [100, 100], 10, rng=r).eval_chunk(1000) == 1000  # 3 KB a sample
    monkeypatch.setattr(M, "EVAL_CHUNK_BYTES", 3 * 30 * 24 * 24 * 8)  # 3 samples a chunk
    fresh = simple_convnet(rng=rng(4), dtype=np.float64)
    assert fresh.eval_chunk(1000) == 3
    x, t = r.standard_normal((10, 1, 28, 28)), r.integers(0, 10, 10)
    sizes: list[int] = []
    forward = fresh.forward
    monkeypatch.setattr(
        fresh, "forward", lambda xb, train=False: sizes.append(len(xb)) or forward(xb, train)
    )
    loss, acc = fresh.evaluate(x, t, batch_size=1000)
    assert sizes == [3, 3, 3, 1]
    monkeypatch.undo()
    assert loss == pytest.approx(fresh.loss(x, t, train=False), rel=1e-12)
    assert acc == pytest.approx(np.mean(fresh.forward(x).argmax(axis=1) == t))
    np.testing.assert_array_equal(fresh.predict(x), fresh.forward(x).argmax(axis=1))


def test_state_dict_round_trip(tmp_path):
    r = rng(4)
    a = mlp(6, [5, 4], 3, rng=r, batchnorm=True, dropout=0.2, dtype=np.float64)
    x, t = r.standard_normal((10, 6)), r.integers(0, 3, 10)
    for _ in range(3):  # move the parameters and BN running statistics off their init
        a.gradient(x, t)
        a.flat_params -= 0.1 * a.flat_grads
    state = a.state_dict()
    assert {"running_mean1", "running_var1", "running_mean2", "running_var2"} <= set(state)
    owned = [a.flat_params] + [
        arr for layer in a.layers if isinstance(layer, L.BatchNorm)
        for arr in (layer.running_mean, layer.running_var)
    ]  # fmt: skip
    assert not any(np.shares_memory(v, o) for v in state.values() for o in owned)  # copies

    np.savez(tmp_path / "params.npz", **state)
    loaded = dict(np.load(tmp_path / "params.npz"))
    b = mlp(6, [5, 4], 3, rng=rng(99), batchnorm=True, dropout=0.2, dtype=np.float64)
    flat = b.flat_params
    b.load_state_dict(loaded)
    np.testing.assert_array_equal(b.flat_params, a.flat_params)
    np.testing.assert_array_equal(b.forward(x), a.forward(x))  # eval mode: running stats
    assert b.flat_params is flat and all(np.shares_memory(v, flat) for v in b.params.values())


def test_engine_imports_leave_hydra_mlflow_optuna_out():
    code = (
        "import sys\n"
        "import sweeps.nn, sweeps.optim, sweeps.train, sweeps.gradcheck\n"
        "print(sorted(m for m in ('hydra', 'omegaconf', 'mlflow', 'optuna') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# -- run order: a ReLU before max pooling runs after it ---------------------------------------


def _book_order_pass(model: Sequential, x: np.ndarray, t: np.ndarray):
    """Loss, logits, input gradient and parameter gradients with every layer run in
    ``model.layers``' own order (the book's), by hand."""
    h = x
    for layer in model.layers:
        h = layer.forward(h, True)
    loss = model.loss_layer.forward(h, t)
    d = model.loss_layer.backward()
    for layer in reversed(model.layers):
        d = layer.backward(d)
    return loss, h, d, model.flat_grads.copy()


def _run_order_pass(model: Sequential, x: np.ndarray, t: np.ndarray):
    loss = model.gradient(x, t)
    out = model.out.copy()
    d = model.loss_layer.backward()
    for layer in reversed(model.run_order):
        d = layer.backward(d)
    return loss, out, d, model.flat_grads.copy()


@pytest.mark.parametrize("pool", [(2, 2, 2, 0), (3, 3, 2, 1), (2, 2, 1, 0)])
def test_max_pooling_runs_before_the_relu_with_the_same_values_and_gradients(pool):
    r = rng(4)
    # small integers: the convolution's outputs tie within windows and many are <= 0, the
    # cases where the first maximum and the ReLU's zero gradient matter
    W = r.integers(-2, 3, (3, 2, 3, 3)).astype(np.float64)
    conv = L.Convolution(W, r.integers(-1, 2, 3).astype(np.float64))
    pooling = L.MaxPooling(*pool)
    x = r.integers(-1, 2, (5, 2, 9, 9)).astype(np.float64)
    flat = 3 * (((7 + 2 * pool[3] - pool[0]) // pool[2] + 1) ** 2)
    fc = L.Affine(r.standard_normal((flat, 4)), np.zeros(4))
    model = Sequential(
        [conv, L.ReLU(), pooling, L.Flatten(), fc], L.SoftmaxCrossEntropy(), (2, 9, 9), [1],
        np.float64,
    )  # fmt: skip
    assert model.run_order[1:3] == [pooling, model.layers[1]]
    t = r.integers(0, 4, 5)
    conv_out = conv.forward(x)
    windows_with_ties = (conv_out[:, :, :-1, :-1] == conv_out[:, :, 1:, 1:]).sum()
    assert windows_with_ties > 10 and (conv_out <= 0).mean() > 0.2  # the cases are there
    book = _book_order_pass(model, x, t)
    fused = _run_order_pass(model, x, t)
    assert fused[0] == book[0]
    for a, b in zip(fused[1:], book[1:], strict=True):
        np.testing.assert_array_equal(a, b)  # exactly (0.0 == -0.0)
    assert np.abs(book[3]).max() > 0


def test_run_order_leaves_other_layers_and_padded_pooling_alone():
    r = rng(0)
    conv = L.Convolution(r.standard_normal((2, 1, 3, 3)), np.zeros(2))
    wide_pad = L.MaxPooling(2, 2, 2, pad=2)  # a window of padding alone: -inf
    sigmoid_first = [conv, L.Sigmoid(), L.MaxPooling(2, 2, 2)]
    for layers in (sigmoid_first, [conv, L.ReLU(), wide_pad]):
        model = Sequential([*layers, L.Flatten()], L.MeanSquaredError(), (1, 8, 8))
        assert model.run_order == model.layers


def test_hidden_activations_still_see_the_relu_before_pooling():
    model = simple_convnet(rng=rng(), input_shape=(1, 12, 12), filters=4)
    assert [type(layer).__name__ for layer in model.run_order[:3]] == [
        "Convolution", "MaxPooling", "ReLU",
    ]  # fmt: skip
    x = rng(1).random((3, 1, 12, 12), dtype=np.float32)
    first = model.hidden_activations(x)[0]
    assert first.shape == (3, 4, 8, 8) and first.min() == 0.0  # the full map, after ReLU
    deep = deep_convnet(rng=rng())
    assert [type(layer).__name__ for layer in deep.run_order].count("MaxPooling") == 3
    assert all(
        type(a).__name__ != "ReLU" or type(b).__name__ != "MaxPooling"
        for a, b in zip(deep.run_order, deep.run_order[1:], strict=False)
    )
