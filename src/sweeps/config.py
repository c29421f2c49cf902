"""Schemas for the config groups, and their validation.

Every option of every group is a dataclass registered in Hydra's ConfigStore as
``<group>/schema_<option>``; its YAML file under ``conf/<group>/`` lists that schema first in
its defaults. So an unknown key or a wrong type fails when Hydra composes the config, and
``validate`` (which builds the dataclass objects, running ``__post_init__``) rejects
out-of-range values before any data is loaded or any training starts.

Below the entry points nothing reads a DictConfig: ``validate`` returns a ``RunConfig`` of
plain dataclasses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from sweeps.data import validation_size
from sweeps.nn.init import Init
from sweeps.optim import WeightDecay, make_optimizer
from sweeps.stores import DEFAULT_ARTIFACT_ROOT, check_tracking_uri
from sweeps.train import TrainSettings

GROUPS = (
    "data",
    "model",
    "optimizer",
    "init",
    "activation",
    "batchnorm",
    "dropout",
    "weight_decay",
)
DTYPES = ("float32", "float64")


def conf_dir() -> Path:
    """Where the YAML configs live: inside the installed package, or ``conf/`` at the root of
    a source checkout (editable install)."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "conf"


def _check_optimizer(conf: OptimizerConf) -> None:
    try:
        make_optimizer(**conf.hyperparameters())
    except ValueError as e:  # optim names the bare key ("lr must be ..."); add the group
        raise ValueError(f"optimizer.{e}") from None


# -- optimizer -----------------------------------------------------------------------------


@dataclass
class OptimizerConf:
    name: str = MISSING
    lr: float = 0.01

    def __post_init__(self) -> None:
        _check_optimizer(self)

    def hyperparameters(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()}


@dataclass
class SGDConf(OptimizerConf):
    name: str = "sgd"


@dataclass
class MomentumConf(OptimizerConf):
    name: str = "momentum"
    momentum: float = 0.9


@dataclass
class NesterovConf(MomentumConf):
    name: str = "nesterov"


@dataclass
class AdaGradConf(OptimizerConf):
    name: str = "adagrad"
    eps: float = 1e-7


@dataclass
class RMSpropConf(OptimizerConf):
    name: str = "rmsprop"
    decay_rate: float = 0.99
    eps: float = 1e-7


@dataclass
class AdamConf(OptimizerConf):
    name: str = "adam"
    lr: float = 0.001
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-7


# -- init ----------------------------------------------------------------------------------


@dataclass
class InitConf:
    name: str = MISSING

    def __post_init__(self) -> None:
        self.build()

    def build(self) -> Init:
        return Init(**vars(self))


@dataclass
class StdInitConf(InitConf):
    name: str = "std"
    std: float = 0.01


@dataclass
class XavierInitConf(InitConf):
    name: str = "xavier"


@dataclass
class HeInitConf(InitConf):
    name: str = "he"


@dataclass
class ReceivingInitConf(InitConf):
    name: str = "receiving"


@dataclass
class GlorotUniformInitConf(InitConf):
    name: str = "glorot_uniform"


@dataclass
class UniformInitConf(InitConf):
    name: str = "uniform"
    low: float = 0.0
    high: float = 0.1


# -- activation, batchnorm, dropout, weight decay --------------------------------------------

ACTIVATIONS = ("relu", "sigmoid", "tanh")


@dataclass
class ActivationConf:
    name: str = "relu"

    def __post_init__(self) -> None:
        if self.name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.name!r}; choose from {list(ACTIVATIONS)}")


@dataclass
class BatchNormConf:
    enabled: bool = False
    momentum: float = 0.9
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"batchnorm.momentum must be in [0, 1), got {self.momentum!r}")
        if not self.eps > 0:
            raise ValueError(f"batchnorm.eps must be > 0, got {self.eps!r}")


@dataclass
class DropoutConf:
    enabled: bool = False
    ratio: float = 0.5
    inverted: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"dropout.ratio must be in [0, 1), got {self.ratio!r}")

    @property
    def effective_ratio(self) -> float | None:
        return self.ratio if self.enabled and self.ratio > 0 else None


@dataclass
class WeightDecayConf:
    name: str = "off"
    strength: float = 0.0

    def __post_init__(self) -> None:
        self.build()

    def build(self) -> WeightDecay:
        return WeightDecay(self.strength)


# -- model ---------------------------------------------------------------------------------

MODELS = ("mlp", "simple_cnn", "deep_cnn")
LOSSES = ("softmax_ce", "softmax_ce_clipped", "mse")


@dataclass
class ModelConf:
    name: str = MISSING


@dataclass
class MLPConf(ModelConf):
    name: str = "mlp"
    hidden_sizes: list[int] = field(default_factory=lambda: [100, 100, 100, 100])
    bias: bool = True
    output_activation: str | None = None
    loss: str = "softmax_ce"
    mse_targets: list[float] = field(default_factory=lambda: [0.0, 1.0])

    def __post_init__(self) -> None:
        if not self.hidden_sizes or any(not isinstance(h, int) or h < 1 for h in self.hidden_sizes):
            raise ValueError(
                "model.hidden_sizes must be a non-empty list of integers >= 1, "
                f"got {self.hidden_sizes!r}"
            )
        if self.loss not in LOSSES:
            raise ValueError(f"unknown model.loss {self.loss!r}; choose from {list(LOSSES)}")
        if self.output_activation not in (None, *ACTIVATIONS):
            raise ValueError(
                f"unknown model.output_activation {self.output_activation!r}; "
                f"choose from {[None, *ACTIVATIONS]}"
            )
        if len(self.mse_targets) != 2:
            raise ValueError(f"model.mse_targets must be [off, on], got {self.mse_targets!r}")


@dataclass
class SimpleCNNConf(ModelConf):
    name: str = "simple_cnn"
    filters: int = 30
    filter_size: int = 5
    stride: int = 1
    pad: int = 0
    hidden_size: int = 100

    def __post_init__(self) -> None:
        for key in ("filters", "filter_size", "stride", "hidden_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)!r}")
        if self.pad < 0:
            raise ValueError(f"model.pad must be >= 0, got {self.pad!r}")


@dataclass
class DeepCNNConf(ModelConf):
    name: str = "deep_cnn"
    hidden_size: int = 50
    dropout_on_logits: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size < 1:
            raise ValueError(f"model.hidden_size must be >= 1, got {self.hidden_size!r}")


# -- data ----------------------------------------------------------------------------------

SCALES = ("unit", "raw", "offset")
MNIST_TRAIN, MNIST_TEST = 60000, 10000
VALIDATIONS = ("holdout", "test")


@dataclass
class DataConf:
    """``name``: mnist (the real set) or synthetic (tiny generated digits, for tests).
    The book's protocol: take the first ``train_size`` training samples (null: all), shuffle
    them with the run's seed and hold out ``val_fraction`` as validation. ``test_size`` cuts
    the test set (null: all 10000).

    Two switches exist only to reproduce source systems that break this protocol:
    ``shuffle: false`` keeps the training file's order (needs val_fraction 0), and
    ``validation: test`` evaluates the test set as the per-epoch validation set (the Keras
    ``validation_data=(x_test, y_test)`` habit; needs val_fraction 0). Such runs report
    test accuracy, but it has been watched during training: never select on it."""

    name: str = "mnist"
    train_size: int | None = None
    val_fraction: float = 0.2
    test_size: int | None = None
    scale: str = "unit"
    shuffle: bool = True
    validation: str = "holdout"
    root: str | None = None
    synthetic_train: int = 600
    synthetic_test: int = 200

    def __post_init__(self) -> None:
        if self.name not in ("mnist", "synthetic"):
            raise ValueError(f"unknown data {self.name!r}; choose from ['mnist', 'synthetic']")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction!r}")
        for key in ("train_size", "test_size"):
            value = getattr(self, key)
            if value is not None and value < 2:
                raise ValueError(f"data.{key} must be null or >= 2, got {value!r}")
        if self.scale not in SCALES:
            raise ValueError(f"unknown data.scale {self.scale!r}; choose from {list(SCALES)}")
        # the sizes are known before any data loads: check them here, not when the run exists
        sizes = {
            "mnist": (MNIST_TRAIN, MNIST_TEST),
            "synthetic": (self.synthetic_train, self.synthetic_test),
        }[self.name]
        for key, available in zip(("train_size", "test_size"), sizes, strict=True):
            value = getattr(self, key)
            if value is not None and value > available:
                raise ValueError(
                    f"data.{key}={value} is more than the {available} samples {self.name} has; "
                    f"use null (all) or at most {available}"
                )
        n = self.train_size or sizes[0]
        n_val = validation_size(n, self.val_fraction)
        if self.val_fraction > 0 and not 1 <= n_val <= n - 1:
            raise ValueError(
                f"data.val_fraction={self.val_fraction} of {n} training samples gives {n_val} "
                f"validation and {n - n_val} training samples; both must be >= 1 (raise "
                "data.train_size or change data.val_fraction)"
            )
        if self.validation not in VALIDATIONS:
            raise ValueError(
                f"unknown data.validation {self.validation!r}; choose from {list(VALIDATIONS)}"
            )
        for key, off in (("shuffle", False), ("validation", "test")):
            if getattr(self, key) == off and self.val_fraction != 0:
                raise ValueError(
                    f"data.{key}={off!r} needs data.val_fraction=0, got {self.val_fraction!r}"
                )


# -- trainer, tracking, run ------------------------------------------------------------------


@dataclass
class TrainerConf:
    epochs: int = 10
    batch_size: int = 100
    sampling: str = "shuffle"
    iterations: int | None = None
    eval_batch_size: int = 1000
    eval_train_size: int | None = None
    probe_size: int = 1000
    gradient: str = "backprop"

    def __post_init__(self) -> None:
        self.settings()

    def settings(self) -> TrainSettings:
        return TrainSettings(**vars(self))


@dataclass
class MlflowConf:
    """``tracking_uri``: a database URI (default: SQLite under ``mlruns/``) or the URL of a
    tracking server (``http://host:port``). Artifacts of a local store go to
    ``artifact_root``. ``batch_loss_every``: log every k-th batch loss.
    ``detail_metrics_every``: log the detail metrics (the per-layer activation statistics
    ``act/<k>/...``, ``time/epoch``, ``time/step``, ``iteration``) every k-th epoch and at the
    last one (0: at the last one only); the loss and accuracy curves go every epoch, and
    history.csv holds every epoch's values of all."""

    enabled: bool = True
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_root: str = DEFAULT_ARTIFACT_ROOT
    experiment_name: str = "sweeps"
    run_name: str | None = None
    batch_loss_every: int = 10
    detail_metrics_every: int = 1
    log_model: bool = True
    log_figures: bool = True

    def __post_init__(self) -> None:
        check_tracking_uri(self.tracking_uri)
        if not self.experiment_name.strip():
            raise ValueError(
                f"mlflow.experiment_name must be a non-empty name, got {self.experiment_name!r}"
            )
        if self.batch_loss_every < 1:
            raise ValueError(f"mlflow.batch_loss_every must be >= 1, got {self.batch_loss_every!r}")
        if self.detail_metrics_every < 0:
            raise ValueError(
                "mlflow.detail_metrics_every must be >= 0 (0: the last epoch only), "
                f"got {self.detail_metrics_every!r}"
            )


@dataclass
class RunConfig:
    data: Any = MISSING
    model: Any = MISSING
    optimizer: Any = MISSING
    init: Any = MISSING
    activation: Any = MISSING
    batchnorm: Any = MISSING
    dropout: Any = MISSING
    weight_decay: Any = MISSING
    trainer: TrainerConf = field(default_factory=TrainerConf)
    mlflow: MlflowConf = field(default_factory=MlflowConf)
    seed: int = 0
    dtype: str = "float32"
    sweep_id: str | None = None
    experiment: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {list(DTYPES)}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")


SCHEMAS: dict[str, dict[str, type]] = {
    "optimizer": {
        "sgd": SGDConf,
        "momentum": MomentumConf,
        "nesterov": NesterovConf,
        "adagrad": AdaGradConf,
        "rmsprop": RMSpropConf,
        "adam": AdamConf,
    },
    "init": {
        "std": StdInitConf,
        "xavier": XavierInitConf,
        "he": HeInitConf,
        "uniform": UniformInitConf,
        "receiving": ReceivingInitConf,
        "glorot_uniform": GlorotUniformInitConf,
    },
    "activation": {"activation": ActivationConf},
    "batchnorm": {"batchnorm": BatchNormConf},
    "dropout": {"dropout": DropoutConf},
    "weight_decay": {"weight_decay": WeightDecayConf},
    "model": {"mlp": MLPConf, "simple_cnn": SimpleCNNConf, "deep_cnn": DeepCNNConf},
    "data": {"data": DataConf},
}


def compose(
    overrides: Sequence[str] = (),
    *,
    config_name: str = "config",
    return_hydra_config: bool = False,
    conf: Path | None = None,
) -> DictConfig:
    """Compose ``config_name`` from ``conf`` (default: ``conf_dir()``) with Hydra's Compose
    API and these overrides, exactly as ``python -m sweeps.run`` would. Registers the run
    schemas first; a caller composing another root registers its own schemas before."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_schemas()
    with interrupts_unwrapped(), initialize_config_dir(str(conf or conf_dir()), version_base="1.3"):
        return hydra_compose(
            config_name, overrides=list(overrides), return_hydra_config=return_hydra_config
        )


@contextlib.contextmanager
def interrupts_unwrapped() -> Iterator[None]:
    """Re-raise a Ctrl-C or SIGTERM (a KeyboardInterrupt) that library code wrapped in an
    ordinary exception. One landing inside OmegaConf's attribute lookups comes out as an
    AttributeError inside a ConfigCompositionException: a search worker then counted its
    trial "failed" and went on training, the signal lost."""
    try:
        yield
    except Exception as e:
        interrupt = interrupt_in_chain(e)
        if interrupt is not None:
            raise interrupt from e
        raise


def first_in_chain(
    e: BaseException, match: Callable[[BaseException], bool]
) -> BaseException | None:
    """The first exception, from ``e`` along what each was raised from or while handling
    (``__cause__``, else ``__context__``), for which ``match`` is true; None if none is."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if match(cur):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def interrupt_in_chain(e: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt an exception was raised from or while handling, if any."""
    found = first_in_chain(e, lambda c: isinstance(c, KeyboardInterrupt))
    return cast(KeyboardInterrupt | None, found)


def load(overrides: Sequence[str] = ()) -> RunConfig:
    """The validated RunConfig for these overrides (``validate(compose(overrides))``)."""
    return validate(compose(overrides))


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=RunConfig)
    for group, options in SCHEMAS.items():
        for option, node in options.items():
            cs.store(group=f"schema/{group}", name=option, node=node)


def validate(cfg: DictConfig) -> RunConfig:
    """Build the typed RunConfig from a composed config, running every range check.

    Raises ValueError naming the bad key and value.
    """
    try:
        obj = OmegaConf.to_object(cfg)
    except Exception as e:  # OmegaConf wraps errors raised in __post_init__
        # The first ValueError of ours in the chain carries the message that names the key.
        ours = first_in_chain(
            e,
            lambda c: isinstance(c, ValueError) and not type(c).__module__.startswith("omegaconf"),
        )
        if ours is not None:
            raise ValueError(str(ours)) from None
        raise
    assert isinstance(obj, RunConfig)
    return obj


def choices_from_config(cfg: RunConfig) -> dict[str, str]:
    """Each group's chosen option, derived from the config itself (``optimizer=adam``...)."""
    return {
        "data": cfg.data.name,
        "model": cfg.model.name,
        "optimizer": cfg.optimizer.name,
        "init": cfg.init.name,
        "activation": cfg.activation.name,
        "batchnorm": "on" if cfg.batchnorm.enabled else "off",
        "dropout": "on" if cfg.dropout.enabled else "off",
        "weight_decay": cfg.weight_decay.name,
    }
