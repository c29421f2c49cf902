"""Layer tests: gradient checks of every layer, activation and loss in float64 (CS231n style:
dx and every parameter gradient through a random upstream dout), im2col/col2im against slow
references, forward outputs against loops, and the layers' contracts (dout never written,
BN and dropout modes, sigmoid saturation)."""

from __future__ import annotations

import numpy as np
import pytest

from sweeps.gradcheck import check_layer, check_loss
from sweeps.nn import functional as F
from sweeps.nn import layers as L

TOL = 1e-6


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def away_from_zero(x: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """Shift values away from 0 so a finite difference never straddles a ReLU kink."""
    return x + margin * np.sign(x)


def distinct(rng: np.random.Generator, shape: tuple[int, ...], gap: float = 0.01) -> np.ndarray:
    """Values at least ``gap`` apart, in random order: no max-pool window has a near-tie."""
    return rng.permutation(int(np.prod(shape))).reshape(shape) * gap - 0.5


def assert_checked(errors: dict[str, float], keys: set[str]) -> None:
    assert set(errors) == keys
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


# -- reference implementations (slow loops, written from the book's definitions) ------------


def im2col_reference(x, FH, FW, stride, pad):
    N, C, H, W = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (H + 2 * pad - FH) // stride + 1, (W + 2 * pad - FW) // stride + 1
    col = np.zeros((N * oh * ow, C * FH * FW), dtype=x.dtype)
    for n in range(N):
        for oy in range(oh):
            for ox in range(ow):
                row = (n * oh + oy) * ow + ox
                for c in range(C):
                    for ky in range(FH):
                        for kx in range(FW):
                            col[row, (c * FH + ky) * FW + kx] = xp[
                                n, c, oy * stride + ky, ox * stride + kx
                            ]
    return col


def col2im_reference(col, x_shape, FH, FW, stride, pad):
    N, C, H, W = x_shape
    oh, ow = (H + 2 * pad - FH) // stride + 1, (W + 2 * pad - FW) // stride + 1
    img = np.zeros((N, C, H + 2 * pad, W + 2 * pad), dtype=col.dtype)
    for n in range(N):
        for oy in range(oh):
            for ox in range(ow):
                row = (n * oh + oy) * ow + ox
                for c in range(C):
                    for ky in range(FH):
                        for kx in range(FW):
                            img[n, c, oy * stride + ky, ox * stride + kx] += col[
                                row, (c * FH + ky) * FW + kx
                            ]
    return img[:, :, pad : pad + H, pad : pad + W]


def conv_reference(x, W, b, stride, pad):
    N, C, H, Wd = x.shape
    FN, _, FH, FW = W.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (H + 2 * pad - FH) // stride + 1, (Wd + 2 * pad - FW) // stride + 1
    out = np.zeros((N, FN, oh, ow))
    for n in range(N):
        for f in range(FN):
            for oy in range(oh):
                for ox in range(ow):
                    patch = xp[n, :, oy * stride : oy * stride + FH, ox * stride : ox * stride + FW]
                    out[n, f, oy, ox] = np.sum(patch * W[f]) + (b[f] if b is not None else 0.0)
    return out


def maxpool_reference(x, ph, pw, stride, pad):
    N, C, H, W = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    oh, ow = (H + 2 * pad - ph) // stride + 1, (W + 2 * pad - pw) // stride + 1
    out = np.zeros((N, C, oh, ow))
    for oy in range(oh):
        for ox in range(ow):
            window = xp[:, :, oy * stride : oy * stride + ph, ox * stride : ox * stride + pw]
            out[:, :, oy, ox] = window.max(axis=(2, 3))
    return out


# -- im2col / col2im -------------------------------------------------------------------------

IM2COL_CASES = [
    # (x shape, FH, FW, stride, pad)
    ((2, 3, 7, 7), 5, 5, 1, 0),
    ((2, 3, 7, 6), 3, 3, 1, 1),
    ((1, 2, 7, 6), 3, 3, 2, 1),
    ((2, 1, 6, 9), 3, 2, 2, 2),
    ((3, 2, 5, 4), 2, 2, 2, 0),
    ((1, 1, 4, 4), 4, 4, 1, 0),
]


def test_im2col_book_shapes(rng):
    assert F.im2col(rng.random((1, 3, 7, 7)), 5, 5, 1, 0).shape == (9, 75)
    assert F.im2col(rng.random((10, 3, 7, 7)), 5, 5, 1, 0).shape == (90, 75)


@pytest.mark.parametrize(("shape", "FH", "FW", "stride", "pad"), IM2COL_CASES)
def test_im2col_and_col2im_match_reference(rng, shape, FH, FW, stride, pad):
    x = rng.standard_normal(shape)
    col = F.im2col(x, FH, FW, stride, pad)
    np.testing.assert_array_equal(col, im2col_reference(x, FH, FW, stride, pad))
    c = rng.standard_normal(col.shape)
    np.testing.assert_allclose(
        F.col2im(c, shape, FH, FW, stride, pad),
        col2im_reference(c, shape, FH, FW, stride, pad),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize(("shape", "FH", "FW", "stride", "pad"), IM2COL_CASES)
def test_col2im_is_the_adjoint_of_im2col(rng, shape, FH, FW, stride, pad):
    """<im2col(x), c> == <x, col2im(c)> for random x and c."""
    x = rng.standard_normal(shape)
    col = F.im2col(x, FH, FW, stride, pad)
    c = rng.standard_normal(col.shape)
    lhs = np.vdot(col, c)
    rhs = np.vdot(x, F.col2im(c, shape, FH, FW, stride, pad))
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_conv_output_size():
    assert F.conv_output_size(28, 5, 1, 0) == 24
    assert F.conv_output_size(14, 3, 1, 2) == 16
    assert F.conv_output_size(7, 3, 2, 1) == 4


# -- gradient checks, layer by layer ---------------------------------------------------------


@pytest.mark.parametrize(
    ("x_shape", "bias"),
    [((3, 5), True), ((3, 5), False), ((3, 2, 3, 2), True)],
    ids=["bias", "no-bias", "4d-input"],
)
def test_affine_gradients(rng, x_shape, bias):
    D = int(np.prod(x_shape[1:]))
    layer = L.Affine(rng.standard_normal((D, 4)), rng.standard_normal(4) if bias else None)
    x = rng.standard_normal(x_shape)
    out = layer.forward(x)
    expected = x.reshape(3, -1) @ layer.params["W"] + (layer.params["b"] if bias else 0.0)
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    assert layer.backward(np.ones_like(out)).shape == x_shape
    assert_checked(check_layer(layer, x, rng=rng), {"x", "W", "b"} if bias else {"x", "W"})


@pytest.mark.parametrize("Act", [L.ReLU, L.Sigmoid, L.Tanh])
def test_activation_gradients(rng, Act):
    x = away_from_zero(2.0 * rng.standard_normal((4, 6)))
    assert_checked(check_layer(Act(), x, rng=rng), {"x"})


def test_activation_values():
    x = np.array([-2.0, -0.5, 0.0, 0.5, 2.0])
    np.testing.assert_array_equal(L.ReLU().forward(x), [0.0, 0.0, 0.0, 0.5, 2.0])
    np.testing.assert_allclose(L.Sigmoid().forward(x), 1 / (1 + np.exp(-x)), rtol=1e-14)
    np.testing.assert_allclose(L.Tanh().forward(x), np.tanh(x), rtol=1e-14)


def test_sigmoid_does_not_overflow():
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0])
    layer = L.Sigmoid()
    with np.errstate(all="raise"):
        out = layer.forward(x)
        dx = layer.backward(np.ones_like(x))
        out32 = L.Sigmoid().forward(x.astype(np.float32))
    assert out[0] == 0.0 and out[-1] == 1.0 and out[2] == 0.5
    assert np.all(np.isfinite(dx)) and dx[0] == 0.0 and dx[-1] == 0.0
    assert out32.dtype == np.float32 and np.all(np.isfinite(out32))


def make_bn(rng, n):
    return L.BatchNorm(rng.uniform(0.5, 1.5, n), rng.normal(0.0, 0.5, n))


@pytest.mark.parametrize("x_shape", [(5, 4), (2, 3, 4, 5)], ids=["dense", "conv"])
def test_batchnorm_gradients_in_training_mode(rng, x_shape):
    bn = make_bn(rng, x_shape[1])
    x = 3.0 * rng.standard_normal(x_shape) + 1.0
    assert_checked(check_layer(bn, x, rng=rng), {"x", "gamma", "beta"})


def test_batchnorm_conv_normalizes_per_channel(rng):
    bn = L.BatchNorm(np.ones(3), np.zeros(3))
    x = rng.standard_normal((4, 3, 5, 6)) * np.array([1.0, 5.0, 0.1])[:, None, None] + 7.0
    out = bn.forward(x, train=True)
    mean = out.mean(axis=(0, 2, 3))
    var = out.var(axis=(0, 2, 3))
    np.testing.assert_allclose(mean, 0.0, atol=1e-12)
    batch_var = x.var(axis=(0, 2, 3))
    np.testing.assert_allclose(var, batch_var / (batch_var + bn.eps), rtol=1e-10)
    # running stats: momentum*running + (1 - momentum)*batch, from mean 0 and var 1
    np.testing.assert_allclose(bn.running_mean, 0.1 * x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * batch_var, rtol=1e-12)


@pytest.mark.parametrize("x_shape", [(5, 4), (2, 4, 3, 3)], ids=["dense", "conv"])
def test_batchnorm_eval_mode_uses_running_stats(rng, x_shape):
    C = x_shape[1]
    bn = make_bn(rng, C)
    bn.running_mean[...] = rng.standard_normal(C)
    bn.running_var[...] = rng.uniform(0.5, 2.0, C)
    mean_before, var_before = bn.running_mean.copy(), bn.running_var.copy()
    x = rng.standard_normal(x_shape)
    out = bn.forward(x, train=False)
    axis = (slice(None),) + (None,) * (len(x_shape) - 2)  # broadcast (C,) over H, W
    gamma, beta = bn.params["gamma"][axis], bn.params["beta"][axis]
    rm, rv = bn.running_mean[axis], bn.running_var[axis]
    np.testing.assert_allclose(out, gamma * (x - rm) / np.sqrt(rv + bn.eps) + beta, rtol=1e-12)
    # each sample on its own: evaluation does not depend on the batch
    np.testing.assert_allclose(bn.forward(x[:1], train=False), out[:1], rtol=1e-12)
    np.testing.assert_array_equal(bn.running_mean, mean_before)
    np.testing.assert_array_equal(bn.running_var, var_before)


@pytest.mark.parametrize("inverted", [True, False], ids=["inverted", "book"])
def test_dropout_gradients_with_frozen_mask(rng, inverted):
    layer = L.Dropout(0.3, np.random.default_rng(0), inverted=inverted)
    x = rng.standard_normal((6, 5))
    assert_checked(check_layer(layer, x, rng=rng), {"x"})
    assert layer.freeze_mask is False  # the check restores the flag


@pytest.mark.parametrize("inverted", [True, False], ids=["inverted", "book"])
def test_dropout_training_and_eval(inverted):
    ratio = 0.25
    layer = L.Dropout(ratio, np.random.default_rng(0), inverted=inverted)
    x = np.full((200, 100), 2.0)
    out = layer.forward(x, train=True)
    kept_value = 2.0 / (1 - ratio) if inverted else 2.0
    assert set(np.unique(out)) == {0.0, kept_value}
    assert np.mean(out != 0) == pytest.approx(1 - ratio, abs=0.01)
    dx = layer.backward(np.ones_like(x))
    np.testing.assert_array_equal(dx, out / 2.0)  # same mask and scale as the forward pass
    # a new mask per training forward, unless frozen
    assert not np.array_equal(layer.forward(x, train=True), out)
    layer.freeze_mask = True
    first = layer.forward(x, train=True)
    np.testing.assert_array_equal(layer.forward(x, train=True), first)
    # evaluation: identity (inverted) or the book's scaling by (1 - ratio)
    expected = x if inverted else x * (1 - ratio)
    np.testing.assert_array_equal(layer.forward(x, train=False), expected)


def test_dropout_ratio_must_be_in_unit_interval():
    for ratio in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=repr(ratio)):
            L.Dropout(ratio, np.random.default_rng(0))


CONV_CASES = [
    # (x shape, W shape, stride, pad)
    ((2, 3, 7, 6), (4, 3, 3, 3), 1, 0),
    ((2, 3, 7, 6), (4, 3, 3, 3), 1, 1),
    ((2, 3, 7, 6), (4, 3, 3, 3), 2, 1),
    ((2, 3, 7, 6), (4, 3, 3, 3), 2, 2),
    ((2, 2, 5, 8), (3, 2, 3, 2), 1, 0),
    ((1, 1, 9, 7), (2, 1, 5, 5), 2, 0),
]


@pytest.mark.parametrize(("x_shape", "W_shape", "stride", "pad"), CONV_CASES)
def test_convolution_forward_and_gradients(rng, x_shape, W_shape, stride, pad):
    layer = L.Convolution(
        rng.standard_normal(W_shape), rng.standard_normal(W_shape[0]), stride, pad
    )
    x = rng.standard_normal(x_shape)
    np.testing.assert_allclose(
        layer.forward(x),
        conv_reference(x, layer.params["W"], layer.params["b"], stride, pad),
        rtol=1e-10,
        atol=1e-12,
    )
    assert_checked(check_layer(layer, x, rng=rng), {"x", "W", "b"})


def test_convolution_without_bias(rng):
    layer = L.Convolution(rng.standard_normal((2, 3, 3, 3)), None, 1, 1)
    x = rng.standard_normal((2, 3, 5, 4))
    np.testing.assert_allclose(
        layer.forward(x), conv_reference(x, layer.params["W"], None, 1, 1), rtol=1e-10
    )
    assert_checked(check_layer(layer, x, rng=rng), {"x", "W"})


def test_convolution_rejects_bad_arguments(rng):
    with pytest.raises(ValueError, match="stride"):
        L.Convolution(rng.standard_normal((2, 1, 3, 3)), None, stride=0)
    layer = L.Convolution(rng.standard_normal((2, 3, 3, 3)), None)
    with pytest.raises(ValueError, match=r"\(2, 2, 5, 5\)"):
        layer.forward(rng.standard_normal((2, 2, 5, 5)))


POOL_CASES = [
    # (x shape, pool_h, pool_w, stride, pad)
    ((2, 3, 6, 8), 2, 2, 2, 0),
    ((2, 2, 7, 7), 3, 3, 2, 0),  # overlapping windows
    ((2, 2, 5, 6), 2, 2, 2, 1),
    ((1, 2, 6, 5), 3, 3, 1, 1),
    ((2, 1, 7, 9), 2, 2, 2, 0),  # odd sizes: the last row/column is never pooled
]


@pytest.mark.parametrize(("x_shape", "ph", "pw", "stride", "pad"), POOL_CASES)
def test_max_pooling_forward_and_gradients(rng, x_shape, ph, pw, stride, pad):
    layer = L.MaxPooling(ph, pw, stride, pad)
    x = distinct(rng, x_shape)
    np.testing.assert_array_equal(layer.forward(x), maxpool_reference(x, ph, pw, stride, pad))
    assert_checked(check_layer(layer, x, rng=rng), {"x"})


@pytest.mark.parametrize(("x_shape", "ph", "pw", "stride", "pad"), POOL_CASES)
def test_max_pooling_evaluation_gives_the_training_output(rng, x_shape, ph, pw, stride, pad):
    """Evaluation takes the max alone (its own passes, no argmax): the same values, C order,
    on plain and channel-major (a convolution's output) inputs, with ties; a backward pass
    after it routes as after a training pass."""
    ties = np.round(rng.standard_normal(x_shape))  # many equal values, zeros among them
    channel_major = np.ascontiguousarray(ties.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    for x in (ties, channel_major, distinct(rng, x_shape)):
        train, evaluate = L.MaxPooling(ph, pw, stride, pad), L.MaxPooling(ph, pw, stride, pad)
        expected = train.forward(x, train=True)
        out = evaluate.forward(x, train=False)
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(out, maxpool_reference(x, ph, pw, stride, pad))
        assert out.flags.c_contiguous
        dout = rng.standard_normal(out.shape)
        np.testing.assert_array_equal(evaluate.backward(dout), train.backward(dout))


def test_max_pooling_routes_gradient_to_the_max():
    x = np.array([[[[1.0, 5.0], [3.0, 2.0]]]])
    layer = L.MaxPooling(2, 2, 2)
    assert layer.forward(x).item() == 5.0
    np.testing.assert_array_equal(
        layer.backward(np.array([[[[7.0]]]])), [[[[0.0, 7.0], [0.0, 0.0]]]]
    )


def test_flatten_gradients(rng):
    layer = L.Flatten()
    x = rng.standard_normal((2, 3, 4, 5))
    assert layer.forward(x).shape == (2, 60)
    assert_checked(check_layer(layer, x, rng=rng), {"x"})


def test_softmax_cross_entropy_value_and_gradient(rng):
    loss = L.SoftmaxCrossEntropy()
    x = 3.0 * rng.standard_normal((5, 10))
    t = rng.integers(0, 10, 5)
    y = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    assert loss.forward(x, t) == pytest.approx(-np.mean(np.log(y[np.arange(5), t])), rel=1e-12)
    assert check_loss(loss, x, t) < TOL
    # large logits stay finite (log-softmax: no overflow; exp may underflow to 0, harmlessly)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        assert np.isfinite(loss.forward(np.array([[1000.0, -1000.0, 0.0]]), np.array([1])))


def test_clipped_softmax_cross_entropy_drops_saturated_samples(rng):
    """Keras 2.2's clipped probabilities: a confidently wrong sample (p_true < 1e-7) and a
    confidently right one (p_true > 1 - 1e-7) give no gradient; the others the usual one."""
    clipped, plain = L.SoftmaxCrossEntropy(clip=1e-7), L.SoftmaxCrossEntropy()
    x = rng.standard_normal((4, 10))
    t = np.array([0, 1, 2, 3])
    x[2] = 0.0
    x[2, 5] = 40.0  # true class 2 has p ~ e^-40: confidently wrong
    x[3, 3] = 40.0  # confidently right
    value = clipped.forward(x, t)
    y = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    p = np.clip(y[np.arange(4), t], 1e-7, 1 - 1e-7)
    assert value == pytest.approx(-np.mean(np.log(p)), rel=1e-12)
    g = clipped.backward()
    plain.forward(x, t)
    expected = plain.backward()
    np.testing.assert_array_equal(g[2:], 0.0)
    np.testing.assert_allclose(g[:2], expected[:2], rtol=1e-12)
    assert check_loss(clipped, x[:2], t[:2]) < TOL  # unclipped samples: the exact gradient
    with pytest.raises(ValueError, match=r"clip must be None or in \(0, 0.5\), got 0.7"):
        L.SoftmaxCrossEntropy(clip=0.7)


@pytest.mark.parametrize("targets", [(0.0, 1.0), (0.01, 0.99)])
def test_mean_squared_error_value_and_gradient(rng, targets):
    loss = L.MeanSquaredError(*targets)
    y = rng.random((4, 10))
    t = rng.integers(0, 10, 4)
    onehot = np.full((4, 10), targets[0])
    onehot[np.arange(4), t] = targets[1]
    assert loss.forward(y, t) == pytest.approx(0.5 * np.sum((y - onehot) ** 2) / 4, rel=1e-12)
    assert check_loss(loss, y, t) < TOL


# -- backward never writes into dout ---------------------------------------------------------


def _layers_with_inputs(rng):
    yield L.Affine(rng.standard_normal((6, 4)), rng.standard_normal(4)), rng.standard_normal((3, 6))
    yield L.ReLU(), rng.standard_normal((3, 6))
    yield L.Sigmoid(), rng.standard_normal((3, 6))
    yield L.Tanh(), rng.standard_normal((3, 6))
    yield make_bn(rng, 6), rng.standard_normal((3, 6))
    yield make_bn(rng, 2), rng.standard_normal((3, 2, 4, 4))
    yield L.Dropout(0.5, np.random.default_rng(0)), rng.standard_normal((3, 6))
    yield L.Dropout(0.5, np.random.default_rng(0), inverted=False), rng.standard_normal((3, 6))
    conv = L.Convolution(rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(3), 1, 1)
    yield conv, rng.standard_normal((2, 2, 5, 5))
    yield L.MaxPooling(2, 2, 2), rng.standard_normal((2, 2, 4, 6))
    yield L.MaxPooling(3, 3, 2, 1), rng.standard_normal((2, 2, 5, 5))
    yield L.Flatten(), rng.standard_normal((2, 2, 3, 3))


def test_backward_never_writes_into_dout(rng):
    seen = set()
    for layer, x in _layers_with_inputs(rng):
        out = layer.forward(x, train=True)
        dout = rng.standard_normal(out.shape)
        dout[dout < 0] = 0.0  # zeros and negatives: a ReLU-style in-place mask would show
        dout -= 0.5
        kept = dout.copy()
        layer.backward(dout)
        np.testing.assert_array_equal(dout, kept, err_msg=f"{layer!r} wrote into dout")
        seen.add(type(layer))
    assert seen == {
        L.Affine,
        L.ReLU,
        L.Sigmoid,
        L.Tanh,
        L.BatchNorm,
        L.Dropout,
        L.Convolution,
        L.MaxPooling,
        L.Flatten,
    }


def test_check_layer_needs_float64(rng):
    layer = L.Affine(rng.standard_normal((3, 2)).astype(np.float32), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="float64"):
        check_layer(layer, rng.standard_normal((2, 3)))
