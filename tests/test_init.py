"""Weight initialization schemes: formulas, sample statistics, errors, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sweeps.nn import Init, deep_convnet, mlp
from sweeps.nn.init import SCHEMES

FAN_IN, FAN_OUT = 200, 50
SHAPE = (400, 500)  # 200,000 draws: a sample std is within ~0.16% (1 sigma) of the truth
N = SHAPE[0] * SHAPE[1]


def draw(init: Init, seed: int = 0, fan_in: int = FAN_IN, fan_out: int = FAN_OUT) -> np.ndarray:
    return init(SHAPE, fan_in, fan_out, np.random.default_rng(seed), np.float64)


def test_scale_formulas():
    assert Init("std", std=0.05).scale(FAN_IN, FAN_OUT) == 0.05
    assert Init("xavier").scale(100, 7) == pytest.approx(0.1)  # sqrt(1/fan_in)
    assert Init("he").scale(100, 7) == pytest.approx(math.sqrt(0.02))  # sqrt(2/fan_in)
    assert Init("receiving").scale(7, 25) == pytest.approx(0.2)  # 1/sqrt(fan_out)


@pytest.mark.parametrize(
    ("init", "std"),
    [
        (Init("std", std=0.01), 0.01),
        (Init("std", std=1.0), 1.0),
        (Init("xavier"), math.sqrt(1 / FAN_IN)),
        (Init("he"), math.sqrt(2 / FAN_IN)),
        (Init("receiving"), 1 / math.sqrt(FAN_OUT)),
    ],
    ids=["std-0.01", "std-1", "xavier", "he", "receiving"],
)
def test_normal_schemes_sample_statistics(init, std):
    w = draw(init)
    assert w.shape == SHAPE
    assert w.std() == pytest.approx(std, rel=5 / math.sqrt(2 * N))  # 5 sigma
    assert abs(w.mean()) < 5 * std / math.sqrt(N)
    # normal, not uniform: about 4.55% of the draws lie beyond 2 sigma
    assert np.mean(np.abs(w) > 2 * std) == pytest.approx(0.0455, abs=0.003)


def test_uniform_range_and_moments():
    low, high = -0.05, 0.1
    w = draw(Init("uniform", low=low, high=high))
    assert w.min() >= low and w.max() < high
    assert w.min() < low + 1e-3 and w.max() > high - 1e-3  # the whole range is used
    assert w.mean() == pytest.approx((low + high) / 2, abs=5 * (high - low) / math.sqrt(12 * N))
    assert w.var() == pytest.approx((high - low) ** 2 / 12, rel=0.01)


def test_uniform_default_is_zero_to_a_tenth():
    w = draw(Init("uniform"))
    assert w.min() >= 0.0 and w.max() < 0.1


def test_glorot_uniform_bound():
    a = math.sqrt(6 / (FAN_IN + FAN_OUT))
    w = draw(Init("glorot_uniform"))
    assert np.abs(w).max() <= a and np.abs(w).max() > 0.999 * a
    assert w.std() == pytest.approx(a / math.sqrt(3), rel=0.01)
    assert abs(w.mean()) < 5 * a / math.sqrt(3 * N)


def test_unknown_scheme_lists_the_choices():
    with pytest.raises(ValueError, match="'kaiming'") as info:
        Init("kaiming")
    for name in ("std", "xavier", "he", "uniform", "receiving", "glorot_uniform"):
        assert name in str(info.value)
    assert set(SCHEMES) == {"std", "xavier", "he", "uniform", "receiving", "glorot_uniform"}


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"name": "std", "std": 0.0}, "std"),
        ({"name": "std", "std": -1.0}, "std"),
        ({"name": "uniform", "low": 0.1, "high": 0.1}, "low"),
    ],
)
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        Init(**kw)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_same_seed_same_weights(name):
    init = Init(name)
    np.testing.assert_array_equal(draw(init, seed=7), draw(init, seed=7))
    assert not np.array_equal(draw(init, seed=7), draw(init, seed=8))


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_dtype_is_respected(name):
    w = Init(name)((3, 4), 3, 4, np.random.default_rng(0), np.float32)
    assert w.dtype == np.float32


def test_models_use_fan_in_of_each_layer():
    """He on the book's DeepConvNet: fan_in = C*3*3 for the convolutions (9, 144, 144, 288,
    288, 576), the flattened size for the affine layers (1024, 50); biases start at zero."""
    model = deep_convnet(rng=np.random.default_rng(0), init=Init("he"))
    fans = [9, 144, 144, 288, 288, 576, 1024, 50]
    for i, fan_in in enumerate(fans, start=1):
        w = model.params[f"W{i}"]
        if w.size >= 2000:  # enough draws for a tight estimate
            assert w.std() == pytest.approx(math.sqrt(2 / fan_in), rel=5 / math.sqrt(2 * w.size))
        assert not np.any(model.params[f"b{i}"])


def test_mlp_init_per_layer():
    model = mlp(784, [100], 10, rng=np.random.default_rng(0), init=Init("xavier"))
    assert model.params["W1"].std() == pytest.approx(math.sqrt(1 / 784), rel=0.02)
    assert model.params["W2"].std() == pytest.approx(math.sqrt(1 / 100), rel=0.1)
    model = mlp(784, [100], 10, rng=np.random.default_rng(0), init=Init("receiving"))
    assert model.params["W1"].std() == pytest.approx(math.sqrt(1 / 100), rel=0.02)
