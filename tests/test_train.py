"""The training loop: it learns, a seed fixes the whole run, sampling modes and the iteration
cap count as documented, divergence is reported, and numerical-gradient training takes the
same first step as backprop. All on synthetic data (no files, no network)."""

from __future__ import annotations

import numpy as np
import pytest

from sweeps.data import synthetic_mnist
from sweeps.experiment import build_model, load_splits, train
from sweeps.nn import mlp, simple_convnet
from sweeps.optim import WeightDecay, make_optimizer
from sweeps.train import (
    ActivationStats,
    Callback,
    DivergedError,
    TrainSettings,
    activation_stats,
    batches,
    fit,
)

SMALL = ["model.hidden_sizes=[30]", "data.synthetic_train=300", "data.synthetic_test=50"]


def history_arrays(history) -> dict[str, np.ndarray]:
    """Every recorded series except wall-clock time."""
    keys = [k for k in history.epochs[0] if not k.startswith("time/")]
    out = {k: history.series(k) for k in keys}
    out["batch_losses"] = np.array(history.batch_losses)
    return out


def tiny_data(n: int = 250, d: int = 4, classes: int = 3, seed: int = 0):
    r = np.random.default_rng(seed)
    return r.standard_normal((n, d)).astype(np.float32), r.integers(0, classes, n)


# -- learning and reproducibility --------------------------------------------------------------


def test_fit_learns_synthetic_digits():
    train_set, val_set = synthetic_mnist(600, 200, seed=0)
    rng = np.random.default_rng(0)
    model = mlp(784, [50], 10, rng=rng)
    history = fit(
        model,
        make_optimizer("sgd", lr=0.1),
        (train_set.x, train_set.t),
        (val_set.x, val_set.t),
        TrainSettings(epochs=5, batch_size=50),
        rng,
    )
    assert len(history.epochs) == 5
    assert history.last("val/acc") > 0.6  # chance is 0.1
    assert history.last("train/loss") < history.epochs[0]["train/loss"]


def test_same_seed_bit_identical_different_seed_different(run_cfg):
    overrides = [*SMALL, "dropout=on", "trainer.sampling=replacement"]
    a = train(run_cfg([*overrides, "seed=3"]))
    b = train(run_cfg([*overrides, "seed=3"]))
    c = train(run_cfg([*overrides, "seed=4"]))
    ha, hb, hc = history_arrays(a.history), history_arrays(b.history), history_arrays(c.history)
    assert ha.keys() == hb.keys()
    for key in ha:
        np.testing.assert_array_equal(ha[key], hb[key], err_msg=key)
    np.testing.assert_array_equal(a.model.flat_params, b.model.flat_params)
    assert not np.array_equal(ha["batch_losses"], hc["batch_losses"])
    assert not np.array_equal(a.model.flat_params, c.model.flat_params)


def test_float64_option(run_cfg):
    t64 = train(run_cfg([*SMALL, "dtype=float64"]))
    t32 = train(run_cfg([*SMALL, "dtype=float32"]))
    assert t64.model.flat_params.dtype == np.float64 and t64.splits.train.x.dtype == np.float64
    assert t32.model.flat_params.dtype == np.float32
    assert np.all(np.isfinite(t64.history.batch_losses))
    # same seed, same data and batches: the precisions agree closely at the start
    assert t64.history.batch_losses[0] == pytest.approx(t32.history.batch_losses[0], rel=1e-5)


# -- iteration ---------------------------------------------------------------------------------


def test_batches_per_sampling_mode():
    rng = np.random.default_rng(0)
    shuffled = list(batches(250, 100, "shuffle", rng))
    assert [len(b) for b in shuffled] == [100, 100, 50]
    assert sorted(np.concatenate(shuffled)) == list(range(250))  # each sample exactly once
    assert not np.array_equal(np.concatenate(shuffled), np.arange(250))
    sequential = list(batches(250, 100, "sequential", rng))
    np.testing.assert_array_equal(np.concatenate(sequential), np.arange(250))
    drawn = list(batches(250, 100, "replacement", rng))  # the book's np.random.choice
    assert [len(b) for b in drawn] == [100, 100]  # max(250 // 100, 1) draws
    assert all(b.min() >= 0 and b.max() < 250 for b in drawn)
    assert [len(b) for b in batches(30, 100, "replacement", rng)] == [100]  # at least one
    many = np.concatenate(list(batches(1000, 500, "replacement", rng)))
    assert len(np.unique(many)) < 1000  # with replacement: repeats (all-distinct odds ~0)


@pytest.mark.parametrize(
    ("sampling", "per_epoch"), [("shuffle", 3), ("sequential", 3), ("replacement", 2)]
)
def test_fit_counts_updates_per_sampling_mode(sampling, per_epoch):
    x, t = tiny_data()
    rng = np.random.default_rng(0)
    model = mlp(4, [5], 3, rng=rng)
    calls = []

    class Count(Callback):
        def on_batch_end(self, iteration, loss):
            calls.append(iteration)

    settings = TrainSettings(epochs=3, batch_size=100, sampling=sampling)
    history = fit(model, make_optimizer("sgd"), (x, t), None, settings, rng, callbacks=[Count()])
    assert len(history.batch_losses) == 3 * per_epoch
    assert calls == list(range(1, 3 * per_epoch + 1))
    assert history.series("iteration").tolist() == [per_epoch * e for e in (1, 2, 3)]
    assert history.series("epoch").tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(("epochs", "iterations", "n_epochs"), [(1, 7, 3), (10, 4, 2)])
def test_iterations_cap(epochs, iterations, n_epochs):
    """``iterations`` replaces ``epochs``: stop after that many updates, evaluating the epoch
    in progress."""
    x, t = tiny_data()
    rng = np.random.default_rng(0)
    model = mlp(4, [5], 3, rng=rng)
    settings = TrainSettings(epochs=epochs, batch_size=100, iterations=iterations)
    history = fit(model, make_optimizer("sgd"), (x, t), None, settings, rng)
    assert len(history.batch_losses) == iterations
    assert len(history.epochs) == n_epochs
    assert history.last("iteration") == iterations


def test_callbacks_see_the_whole_run():
    x, t = tiny_data(n=40)
    rng = np.random.default_rng(0)
    events = []

    class Record(Callback):
        def on_train_start(self, model):
            events.append("start")

        def on_epoch_end(self, epoch, metrics, model):
            events.append(f"epoch{epoch}")
            assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(metrics)

        def on_train_end(self, history, model):
            events.append("end")

    settings = TrainSettings(epochs=2, batch_size=20)
    fit(mlp(4, [5], 3, rng=rng), make_optimizer("sgd"), (x, t), (x, t), settings, rng,
        callbacks=[Record()])  # fmt: skip
    assert events == ["start", "epoch1", "epoch2", "end"]


def test_weight_decay_penalty_is_part_of_the_batch_loss():
    x, t = tiny_data(n=20)
    rng = np.random.default_rng(0)
    model = mlp(4, [5], 3, rng=rng, dtype=np.float64)
    W = [model.params["W1"], model.params["W2"]]
    expected = model.loss(x, t) + 0.5 * 0.2 * sum(float(np.sum(w * w)) for w in W)
    settings = TrainSettings(epochs=1, batch_size=20, sampling="sequential")
    history = fit(model, make_optimizer("sgd"), (x, t), None, settings, rng, WeightDecay(0.2))
    assert history.batch_losses[0] == pytest.approx(expected, rel=1e-12)


# -- failures ----------------------------------------------------------------------------------


def test_absurd_learning_rate_diverges(run_cfg):
    with np.errstate(all="ignore"), pytest.raises(DivergedError, match="diverged at epoch 1"):
        train(run_cfg([*SMALL, "model.hidden_sizes=[50,50]", "optimizer.lr=1e6"]))


def test_bad_inputs_are_rejected():
    x, t = tiny_data(n=20)
    rng = np.random.default_rng(0)
    model = mlp(4, [5], 3, rng=rng)
    settings = TrainSettings(epochs=1, batch_size=10)
    with pytest.raises(ValueError, match="20 training inputs but 19 labels"):
        fit(model, make_optimizer("sgd"), (x, t[:-1]), None, settings, rng)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        fit(model, make_optimizer("sgd"), (np.zeros((20, 5)), t), None, settings, rng)
    with pytest.raises(ValueError, match="'random'.*shuffle"):
        TrainSettings(sampling="random")
    with pytest.raises(ValueError, match="'finite'.*numerical"):
        TrainSettings(gradient="finite")
    with pytest.raises(ValueError, match="batch_size"):
        TrainSettings(batch_size=0)


# -- numerical-gradient training -------------------------------------------------------------


@pytest.mark.parametrize("dropout", ["off", "on"])
def test_numerical_gradient_training_matches_backprop_first_step(run_cfg, dropout):
    """The book's ch04 comparison as a training option. With dropout the masks of the batch
    must stay fixed across the 2P perturbed passes (and are drawn from the same RNG stream
    as backprop's), so both runs take the same first step."""
    overrides = [
        "model.hidden_sizes=[3]",
        "data.synthetic_train=100",
        "data.synthetic_test=20",
        "dtype=float64",
        "trainer.iterations=1",
        "trainer.batch_size=8",
        "optimizer.lr=0.5",
        f"dropout={dropout}",
    ]
    cfg = run_cfg(overrides)
    backprop = train(cfg)
    numerical = train(run_cfg([*overrides, "trainer.gradient=numerical"]))
    rng = np.random.default_rng(cfg.seed)  # experiment.train's order: split, then init
    splits = load_splits(cfg, rng)
    init = build_model(cfg, rng, splits.train.x.shape[1:]).flat_params
    assert numerical.history.batch_losses == pytest.approx(backprop.history.batch_losses, rel=1e-12)
    step_backprop = backprop.model.flat_params - init
    step_numerical = numerical.model.flat_params - init
    assert np.abs(step_backprop).max() > 1e-3
    np.testing.assert_allclose(step_numerical, step_backprop, rtol=0, atol=1e-8)


# -- activation statistics ---------------------------------------------------------------------


def reference_stats(model, x) -> dict[str, float]:
    """The statistics computed directly, in float64, from a separate forward pass."""
    out: dict[str, float] = {}
    for i, (a, kind) in enumerate(
        zip(model.hidden_activations(x), model.activation_names(), strict=True), 1
    ):
        a = a.astype(np.float64)
        out[f"act/{i}/mean"], out[f"act/{i}/std"] = a.mean(), a.std()
        if kind == "relu":
            out[f"act/{i}/dead"] = np.mean(a == 0)
        elif kind == "sigmoid":
            out[f"act/{i}/saturated"] = np.mean((a < 0.05) | (a > 0.95))
        else:
            out[f"act/{i}/saturated"] = np.mean(np.abs(a) > 0.95)
    return out


def assert_stats_match(got: dict[str, float], want: dict[str, float]) -> None:
    assert list(got) == list(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize(
    "make",
    [
        lambda r: mlp(784, [40, 30, 20], 10, rng=r, activation="relu"),
        lambda r: mlp(784, [40, 30], 10, rng=r, activation="sigmoid", batchnorm=True),
        lambda r: mlp(
            784, [40, 30], 10, rng=r, activation="tanh", dropout=0.3, dropout_inverted=False
        ),
        # its run order is not the book's (ReLU after pooling); the watched pass's is
        lambda r: simple_convnet(rng=r, input_shape=(1, 28, 28), filters=4, hidden_size=20),
    ],
    ids=["relu", "sigmoid-bn", "tanh-book-dropout", "cnn"],
)
def test_evaluation_pass_gives_the_activation_stats_of_its_first_rows(make):
    model = make(np.random.default_rng(0))
    train_set, _ = synthetic_mnist(130, 5, seed=1, flatten=model.input_shape == (784,))
    x, t = train_set.x, train_set.t
    want = reference_stats(model, x[:50])
    for chunk in (16, 50, 1000):  # several chunks (one partial), exactly one, one larger
        stats = ActivationStats(model)
        loss, acc = model.evaluate(x, t, chunk, hidden_rows=50, on_hidden=stats.add)
        assert (loss, acc) == model.evaluate(x, t, chunk)  # watching changes nothing
        assert stats.count == [
            50 * int(np.prod(a.shape[1:])) for a in model.hidden_activations(x[:1])
        ]
        assert_stats_match(stats.result(), want)
    assert_stats_match(activation_stats(model, x[:50]), want)


@pytest.mark.parametrize(
    "val, eval_train_size, probe_size",
    [(True, None, 30), (False, None, 30), (False, 20, 30)],
    ids=["from-validation", "from-training-evaluation", "own-pass"],
)
def test_fit_records_the_probes_activation_stats(val, eval_train_size, probe_size):
    train_set, val_set = synthetic_mnist(200, 60, seed=0)
    rng = np.random.default_rng(0)
    model = mlp(784, [30, 20], 10, rng=rng)
    probe = (val_set.x if val else train_set.x)[:probe_size]
    seen: list[tuple[dict, dict]] = []

    class Check(Callback):
        def on_epoch_end(self, epoch, metrics, model):
            acts = {k: v for k, v in metrics.items() if k.startswith("act/")}
            seen.append((acts, reference_stats(model, probe)))

    fit(
        model,
        make_optimizer("sgd", lr=0.1),
        (train_set.x, train_set.t),
        (val_set.x, val_set.t) if val else None,
        TrainSettings(
            epochs=2,
            batch_size=50,
            eval_batch_size=16,
            eval_train_size=eval_train_size,
            probe_size=probe_size,
        ),
        rng,
        callbacks=[Check()],
    )
    assert len(seen) == 2
    for got, want in seen:
        assert_stats_match(got, want)
