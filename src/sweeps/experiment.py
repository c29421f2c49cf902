"""From a validated RunConfig to a trained model: data, model, optimizer, fit.

This is the one code path that ``sweeps.run``, ``sweeps.optuna_search``, the gradient check
and the benchmark share. It takes plain dataclasses (``sweeps.config.RunConfig``), never a
DictConfig, and knows nothing of MLflow or Optuna: those come in as callbacks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sweeps import data as D
from sweeps.config import RunConfig
from sweeps.nn import Sequential, deep_convnet, mlp, simple_convnet
from sweeps.nn.layers import BatchNorm
from sweeps.optim import Optimizer, make_optimizer
from sweeps.train import Callback, History, fit


@dataclass
class Trained:
    model: Sequential
    history: History
    splits: D.Splits


def needs_images(cfg: RunConfig) -> bool:
    return cfg.model.name in ("simple_cnn", "deep_cnn")


def load_splits(cfg: RunConfig, rng: np.random.Generator) -> D.Splits:
    """Load the configured data and split it with the book's validation protocol."""
    d = cfg.data
    kw = {"flatten": not needs_images(cfg), "dtype": np.dtype(cfg.dtype), "scale": d.scale}
    if d.name == "synthetic":
        kw.update(n_train=d.synthetic_train, n_test=d.synthetic_test, seed=cfg.seed)
        train, test = D.load_dataset("synthetic", **kw)
    else:
        train, test = D.load_dataset(d.name, d.root, **kw)
    splits = D.make_splits(
        train,
        test,
        train_size=d.train_size,
        val_fraction=d.val_fraction,
        rng=rng,
        test_size=d.test_size,
        shuffle=d.shuffle,
    )
    if d.validation == "test":  # a source system's protocol (Keras validation_data=test)
        splits = dataclasses.replace(splits, val=splits.test)
    return splits


def build_model(
    cfg: RunConfig, rng: np.random.Generator, input_shape: tuple[int, ...]
) -> Sequential:
    """The configured network; weights drawn from ``rng``."""
    m = cfg.model
    common = dict(
        rng=rng,
        activation=cfg.activation.name,
        init=cfg.init.build(),
        batchnorm=cfg.batchnorm.enabled,
        dropout=cfg.dropout.effective_ratio,
        dropout_inverted=cfg.dropout.inverted,
        dtype=np.dtype(cfg.dtype),
    )
    if m.name == "mlp":
        if len(input_shape) != 1:
            raise ValueError(f"model mlp needs flat inputs (N, D), got sample shape {input_shape}")
        model = mlp(
            input_shape[0],
            m.hidden_sizes,
            10,
            bias=m.bias,
            output_activation=m.output_activation,
            loss=m.loss,
            mse_targets=tuple(m.mse_targets),
            **common,
        )
    elif m.name == "simple_cnn":
        c, h, w = input_shape  # (C, H, W): another shape fails to unpack, as in the builder
        model = simple_convnet(
            input_shape=(c, h, w),
            filters=m.filters,
            filter_size=m.filter_size,
            stride=m.stride,
            pad=m.pad,
            hidden_size=m.hidden_size,
            **common,
        )
    elif m.name == "deep_cnn":
        c, h, w = input_shape
        model = deep_convnet(
            input_shape=(c, h, w),
            hidden_size=m.hidden_size,
            dropout_on_logits=m.dropout_on_logits,
            **common,
        )
    else:  # the schema only admits the names above
        raise ValueError(f"unknown model {m.name!r}; choose from ['mlp', 'simple_cnn', 'deep_cnn']")
    for layer in model.layers:  # BN hyperparameters from the batchnorm group
        if isinstance(layer, BatchNorm):  # the only layer with running statistics
            layer.momentum, layer.eps = cfg.batchnorm.momentum, cfg.batchnorm.eps
    return model


def build_optimizer(cfg: RunConfig) -> Optimizer:
    hp = cfg.optimizer.hyperparameters()
    return make_optimizer(hp.pop("name"), **hp)


def train(
    cfg: RunConfig,
    callbacks: Sequence[Callback] = (),
    splits: D.Splits | None = None,
    rng: np.random.Generator | None = None,
) -> Trained:
    """Load data, build, and fit. One generator seeded by ``cfg.seed`` drives the split, the
    weights, dropout and the batch order, in that order, so a seed fixes the whole run.
    A caller that made the split itself passes it with the generator it used."""
    if (splits is None) != (rng is None):
        raise ValueError("pass both splits and the rng that made them, or neither")
    if rng is None:
        rng = np.random.default_rng(cfg.seed)
    if splits is None:
        splits = load_splits(cfg, rng)
    model = build_model(cfg, rng, splits.train.x.shape[1:])
    val = (splits.val.x, splits.val.t) if splits.val is not None else None
    history = fit(
        model,
        build_optimizer(cfg),
        (splits.train.x, splits.train.t),
        val,
        cfg.trainer.settings(),
        rng,
        weight_decay=cfg.weight_decay.build(),
        callbacks=callbacks,
    )
    return Trained(model, history, splits)
