"""Config groups, experiment overlays and validation.

Options are discovered by listing ``conf/<group>/*.yaml``, so a new option or overlay is
covered without touching this file.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

import sweeps
from sweeps.config import GROUPS, choices_from_config, conf_dir, validate

CONF = conf_dir()
REPO = Path(__file__).resolve().parents[1]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


EXPERIMENTS = options("experiment")
#: overlays of the other source systems (issue #6): they name their source, not a book script
SOURCE_EXPERIMENTS = {"myonn", "myonn_notebook", "dlwp_naive", "keras_mlp", "keras_mlp_cookbook"}
BOOK_EXPERIMENTS = sorted(set(EXPERIMENTS) - {"quick"} - SOURCE_EXPERIMENTS)


def test_the_config_groups_on_disk_are_the_known_groups():
    on_disk = {p.name for p in CONF.iterdir() if p.is_dir()}
    assert on_disk - {"experiment", "search"} == set(GROUPS)
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no options"
    assert {
        "optimizer_compare",
        "weight_init_compare",
        "batchnorm_compare",
        "overfit_weight_decay",
        "overfit_dropout",
        "simple_cnn",
        "deep_cnn",
        "hyperparameter_trial",
        "quick",
    } <= set(EXPERIMENTS)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_validates(compose_cfg, group, option):
    cfg = validate(compose_cfg([f"{group}={option}"]))
    # Each file's `name` (or on/off switch) matches its file name, so tags derived from the
    # config itself agree with Hydra's choice.
    assert choices_from_config(cfg)[group] == option


# -- experiment overlays ---------------------------------------------------------------------

# The book's protocol for each overlay (book.md), checked on the composed config: the overlays
# list only what differs from config.yaml, so a changed root default must not silently
# change an experiment.
MLP4 = [100] * 4
MLP6 = [100] * 6
PROTOCOLS: dict[str, dict[str, object]] = {
    "optimizer_compare": {
        "data.name": "mnist",
        "data.train_size": None,
        "data.val_fraction": 0.0,
        "model.name": "mlp",
        "model.hidden_sizes": MLP4,
        "activation.name": "relu",
        "init.name": "he",
        "optimizer.name": "sgd",
        "weight_decay.name": "off",
        "batchnorm.enabled": False,
        "dropout.enabled": False,
        "trainer.batch_size": 128,
        "trainer.sampling": "replacement",
        "trainer.iterations": 2000,
        "mlflow.batch_loss_every": 1,
    },
    "weight_init_compare": {
        "data.name": "mnist",
        "data.train_size": None,
        "data.val_fraction": 0.0,
        "model.hidden_sizes": MLP4,
        "activation.name": "relu",
        "optimizer.name": "sgd",
        "optimizer.lr": 0.01,
        "init.name": "he",
        "batchnorm.enabled": False,
        "trainer.batch_size": 128,
        "trainer.sampling": "replacement",
        "trainer.iterations": 2000,
    },
    "batchnorm_compare": {
        "data.name": "mnist",
        "data.train_size": 1000,
        "data.val_fraction": 0.0,
        "model.hidden_sizes": [100] * 5,
        "activation.name": "relu",
        "init.name": "std",
        "optimizer.name": "sgd",
        "optimizer.lr": 0.01,
        "trainer.batch_size": 100,
        "trainer.epochs": 20,
        "trainer.sampling": "replacement",
        "trainer.iterations": None,
        "batchnorm.momentum": 0.9,
        "batchnorm.eps": 1e-6,
    },
    "overfit_weight_decay": {
        "data.train_size": 300,
        "data.val_fraction": 0.0,
        "model.hidden_sizes": MLP6,
        "activation.name": "relu",
        "init.name": "he",
        "optimizer.name": "sgd",
        "optimizer.lr": 0.01,
        "weight_decay.name": "l2",
        "weight_decay.strength": 0.1,
        "dropout.enabled": False,
        "trainer.batch_size": 100,
        "trainer.epochs": 201,
        "trainer.sampling": "replacement",
    },
    "overfit_dropout": {
        "data.train_size": 300,
        "data.val_fraction": 0.0,
        "model.hidden_sizes": MLP6,
        "activation.name": "relu",
        "init.name": "he",
        "optimizer.name": "sgd",
        "optimizer.lr": 0.01,
        "weight_decay.name": "off",
        "dropout.enabled": True,
        "dropout.ratio": 0.15,
        "dropout.inverted": False,
        "trainer.batch_size": 100,
        "trainer.epochs": 301,
        "trainer.sampling": "replacement",
    },
    "simple_cnn": {
        "data.train_size": None,
        "model.name": "simple_cnn",
        "model.filters": 30,
        "model.filter_size": 5,
        "model.hidden_size": 100,
        "init.name": "std",
        "init.std": 0.01,
        "optimizer.name": "adam",
        "optimizer.lr": 0.001,
        "dropout.enabled": False,
        "trainer.batch_size": 100,
        "trainer.epochs": 20,
        "trainer.sampling": "replacement",
        "trainer.eval_train_size": 1000,
    },
    "deep_cnn": {
        "data.train_size": None,
        "model.name": "deep_cnn",
        "model.hidden_size": 50,
        "model.dropout_on_logits": True,
        "init.name": "he",
        "optimizer.name": "adam",
        "optimizer.lr": 0.001,
        "dropout.enabled": True,
        "dropout.ratio": 0.5,
        "dropout.inverted": False,
        "batchnorm.enabled": False,
        "trainer.batch_size": 100,
        "trainer.epochs": 20,
        "trainer.sampling": "replacement",
        "trainer.eval_train_size": 1000,
    },
    "hyperparameter_trial": {
        "data.train_size": 500,
        "data.val_fraction": 0.2,
        "model.hidden_sizes": MLP6,
        "activation.name": "relu",
        "init.name": "he",
        "optimizer.name": "sgd",
        "weight_decay.name": "l2",
        "trainer.batch_size": 100,
        "trainer.epochs": 50,
        "trainer.sampling": "replacement",
    },
    "quick": {"data.train_size": 2000, "trainer.epochs": 2},
    # The source systems of issue #6, each checked against the protocol its source states.
    "book_ch04": {
        "data.train_size": None,
        "data.val_fraction": 0.0,
        "data.scale": "unit",
        "model.hidden_sizes": [50],
        "model.loss": "softmax_ce",
        "activation.name": "sigmoid",
        "init.name": "std",
        "init.std": 0.01,
        "optimizer.name": "sgd",
        "optimizer.lr": 0.1,
        "trainer.batch_size": 100,
        "trainer.sampling": "replacement",
        "trainer.iterations": 10000,
        "trainer.gradient": "backprop",
    },
    "book_ch04_numerical": {
        "model.hidden_sizes": [50],
        "activation.name": "sigmoid",
        "init.std": 0.01,
        "optimizer.lr": 0.1,
        "trainer.batch_size": 100,
        "trainer.gradient": "numerical",
        "dtype": "float64",
    },
    "book_ch05": {
        "data.train_size": None,
        "data.val_fraction": 0.0,
        "model.hidden_sizes": [50],
        "activation.name": "relu",
        "init.name": "std",
        "init.std": 0.01,
        "optimizer.name": "sgd",
        "optimizer.lr": 0.1,
        "trainer.batch_size": 100,
        "trainer.sampling": "replacement",
        "trainer.iterations": 10000,
    },
    "myonn": {
        "data.train_size": None,
        "data.val_fraction": 0.0,
        "data.scale": "offset",
        "data.shuffle": False,
        "model.hidden_sizes": [200],
        "model.bias": False,
        "model.output_activation": "sigmoid",
        "model.loss": "mse",
        "model.mse_targets": [0.01, 0.99],
        "activation.name": "sigmoid",
        "init.name": "receiving",
        "optimizer.name": "sgd",
        "optimizer.lr": 0.2,
        "trainer.batch_size": 1,
        "trainer.sampling": "sequential",
        "trainer.epochs": 2,
        "trainer.iterations": None,
    },
    "myonn_notebook": {
        "data.scale": "offset",
        "data.shuffle": False,
        "model.hidden_sizes": [200],
        "model.bias": False,
        "model.loss": "mse",
        "init.name": "xavier",
        "optimizer.lr": 0.1,
        "trainer.batch_size": 1,
        "trainer.epochs": 5,
    },
    "dlwp_naive": {
        "data.train_size": None,
        "data.val_fraction": 0.0,
        "data.scale": "unit",
        "data.shuffle": False,
        "model.hidden_sizes": [512],
        "model.bias": True,
        "activation.name": "relu",
        "init.name": "uniform",
        "init.low": 0.0,
        "init.high": 0.1,
        "optimizer.name": "sgd",
        "optimizer.lr": 0.001,
        "trainer.batch_size": 128,
        "trainer.sampling": "sequential",
        "trainer.epochs": 10,
        "trainer.iterations": None,
    },
    "keras_mlp": {
        "data.train_size": None,
        "data.val_fraction": 0.0,
        "data.scale": "raw",
        "data.validation": "test",
        "model.hidden_sizes": [1000],
        "model.loss": "softmax_ce",
        "activation.name": "relu",
        "init.name": "glorot_uniform",
        "optimizer.name": "adam",
        "optimizer.lr": 0.001,
        "optimizer.eps": 1e-7,
        "trainer.batch_size": 64,
        "trainer.sampling": "shuffle",
        "trainer.epochs": 50,
    },
    "keras_mlp_cookbook": {
        "model.loss": "softmax_ce_clipped",
        "data.scale": "raw",
        "data.validation": "test",
        "model.hidden_sizes": [1000],
        "init.name": "glorot_uniform",
        "optimizer.name": "adam",
        "trainer.batch_size": 1024,
        "trainer.epochs": 500,
    },
}

# What `python -m sweeps.run -m experiment=<name>` sweeps by itself (hydra.sweeper.params).
SWEEPS: dict[str, dict[str, list]] = {
    "optimizer_compare": {"optimizer": ["sgd", "momentum", "adagrad", "adam"], "seed": [0, 1, 2]},
    "weight_init_compare": {"init": ["std", "xavier", "he"], "seed": [0, 1, 2]},
    "batchnorm_compare": {"batchnorm": ["on", "off"], "init.std": list(np.logspace(0, -4, num=16))},
    "overfit_weight_decay": {"weight_decay": ["l2", "off"]},
    "overfit_dropout": {"dropout": ["on", "off"]},
    **{
        name: {"seed": [0, 1, 2]}
        for name in ("book_ch04", "book_ch05", "myonn", "myonn_notebook", "dlwp_naive", "keras_mlp")
    },
}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_overlay_composes_and_validates(compose_cfg, name):
    cfg = compose_cfg([f"experiment={name}"])
    validate(cfg)
    for key, expected in PROTOCOLS.get(name, {}).items():
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
        if OmegaConf.is_list(value):
            value = list(value)
        assert value == expected, (
            f"experiment={name}: {key} is {value!r}, the book's is {expected!r}"
        )


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_overlay_header_and_comment(name):
    lines = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"  # otherwise the keys land under `experiment.`
    comment = "\n".join(line for line in lines if line.startswith("#"))
    if name in BOOK_EXPERIMENTS:
        assert "ch0" in comment, f"{name}.yaml does not name the book script"
        assert "iffer" in comment or "Same protocol" in comment or "Matched exactly" in comment, (
            f"{name}.yaml: say what differs"
        )
    if name in SOURCE_EXPERIMENTS:
        assert any(
            src in comment for src in ("Neural Network", "Deep Learning with Python", "Keras")
        ), f"{name}.yaml does not name its source"
        assert "iffer" in comment or "Matched exactly" in comment or "protocol" in comment, (
            f"{name}.yaml: say what could not be matched"
        )


def test_every_experiment_is_checked_against_the_book():
    assert set(PROTOCOLS) == set(EXPERIMENTS)


def _sweep_jobs(params: dict[str, str]) -> list[list[str]]:
    """The job overrides Hydra's basic sweeper makes of hydra.sweeper.params, except that a
    plain value (not a group choice) is only tried at its first and last value."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = []
    for o in parsed:
        key = o.get_key_element()
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        if key not in GROUPS:
            values = sorted({values[0], values[-1]}, key=values.index)
        axes.append([f"{key}={v}" for v in values])
    return [list(job) for job in itertools.product(*axes)]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_overlay_sweep_expands_to_the_book_grid_and_every_job_validates(compose_cfg, name):
    hydra_cfg = compose_cfg([f"experiment={name}"], return_hydra_config=True).hydra
    params = hydra_cfg.sweeper.params
    params = OmegaConf.to_container(params) if params is not None else {}
    expected = SWEEPS.get(name, {})
    assert list(params) == list(expected)
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    for o in parsed:
        values = [o.value()] if not o.is_sweep_override() else list(o.sweep_iterator())
        want = expected[o.get_key_element()]
        if o.get_key_element() == "init.std":
            np.testing.assert_array_equal(np.array(values, dtype=float), np.array(want))
        else:
            assert values == want
    for job in _sweep_jobs(params):
        validate(compose_cfg([f"experiment={name}", *job]))


def test_command_line_overrides_beat_the_overlay(compose_cfg):
    cfg = validate(
        compose_cfg(["experiment=overfit_dropout", "dropout.ratio=0.2", "optimizer=adam"])
    )
    assert cfg.dropout.ratio == 0.2 and not cfg.dropout.inverted
    assert cfg.optimizer.name == "adam"


# -- bad input -------------------------------------------------------------------------------


def test_unknown_option_lists_the_choices(compose_cfg):
    with pytest.raises(MissingConfigException) as e:
        compose_cfg(["optimizer=adamm"])
    msg = str(e.value)
    assert "optimizer/adamm" in msg
    for option in options("optimizer"):
        assert option in msg


def test_unknown_key_is_named(compose_cfg):
    with pytest.raises(ConfigCompositionException, match=r"optimizer\.lrr"):
        compose_cfg(["optimizer.lrr=1"])


@pytest.mark.parametrize(
    "override,detail",
    [
        ("optimizer.lr=abc", "Value 'abc' of type 'str' could not be converted to Float"),
        ("trainer.epochs=1.5", "could not be converted to Integer"),
        ("model.hidden_sizes=[a]", "could not be converted to Integer"),
    ],
)
def test_wrong_type_names_key_and_value(compose_cfg, override, detail):
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg([override])
    assert override in str(e.value)  # "Error merging override optimizer.lr=abc"
    assert detail in str(e.value.__cause__)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optimizer.lr=-1"], "optimizer.lr must be a finite number > 0, got -1.0"),
        (["optimizer.lr=nan"], "optimizer.lr must be a finite number > 0, got nan"),
        (
            ["optimizer=momentum", "optimizer.momentum=1.5"],
            "optimizer.momentum must be in [0, 1), got 1.5",
        ),
        (["optimizer=adam", "optimizer.beta2=1"], "optimizer.beta2 must be in [0, 1), got 1.0"),
        (["dropout.ratio=1.5"], "dropout.ratio must be in [0, 1), got 1.5"),
        (["dropout.ratio=-0.1"], "dropout.ratio must be in [0, 1), got -0.1"),
        (["trainer.batch_size=0"], "trainer.batch_size must be an integer >= 1, got 0"),
        (["trainer.epochs=0"], "trainer.epochs must be an integer >= 1, got 0"),
        (["trainer.iterations=0"], "trainer.iterations must be null or an integer >= 1, got 0"),
        (["trainer.sampling=foo"], "unknown trainer.sampling 'foo'; choose from"),
        (["data.val_fraction=1"], "data.val_fraction must be in [0, 1), got 1.0"),
        (["data.train_size=1"], "data.train_size must be null or >= 2, got 1"),
        (
            ["data.train_size=60001"],
            "data.train_size=60001 is more than the 60000 samples mnist has; "
            "use null (all) or at most 60000",
        ),
        (["data.test_size=20000"], "data.test_size=20000 is more than the 10000 samples mnist has"),
        (
            ["data=synthetic", "data.synthetic_train=600", "data.train_size=601"],
            "data.train_size=601 is more than the 600 samples synthetic has",
        ),
        (["data.validation=val"], "unknown data.validation 'val'; choose from ['holdout', 'test']"),
        (["data.validation=test"], "data.validation='test' needs data.val_fraction=0, got 0.2"),
        (["data.shuffle=false"], "data.shuffle=False needs data.val_fraction=0, got 0.2"),
        (
            ["model.hidden_sizes=[]"],
            "model.hidden_sizes must be a non-empty list of integers >= 1, got []",
        ),
        (
            ["model.hidden_sizes=[100,0]"],
            "model.hidden_sizes must be a non-empty list of integers >= 1, got [100, 0]",
        ),
        (["model=simple_cnn", "model.filters=0"], "model.filters must be >= 1, got 0"),
        (["init=std", "init.std=-1"], "init.std must be > 0, got -1.0"),
        (["batchnorm.momentum=1"], "batchnorm.momentum must be in [0, 1), got 1.0"),
        (
            ["weight_decay.strength=-1"],
            "weight_decay.strength must be a finite number >= 0, got -1.0",
        ),
        (
            ["activation.name=elu"],
            "unknown activation 'elu'; choose from ['relu', 'sigmoid', 'tanh']",
        ),
        (["dtype=float16"], "unknown dtype 'float16'; choose from ['float32', 'float64']"),
        (["seed=-1"], "seed must be an integer >= 0, got -1"),
        (["mlflow.batch_loss_every=0"], "mlflow.batch_loss_every must be >= 1, got 0"),
        (
            ["mlflow.detail_metrics_every=-1"],
            "mlflow.detail_metrics_every must be >= 0 (0: the last epoch only), got -1",
        ),
    ],
)
def test_out_of_range_value_names_key_and_value(compose_cfg, overrides, message):
    cfg = compose_cfg(overrides)  # composes: the type is right, the value is not
    with pytest.raises(ValueError) as e:
        validate(cfg)
    assert message in str(e.value)


# -- where the configs live --------------------------------------------------------------------


def test_conf_dir_finds_the_configs():
    assert (CONF / "config.yaml").is_file()
    for group in GROUPS:
        assert (CONF / group).is_dir()


def test_installed_package_finds_its_configs(tmp_path):
    """Lay the package out as the wheel does (pyproject's force-include puts conf/ inside
    the package), import it from there, and compose from outside any checkout."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert include == {"conf": "sweeps/conf"}
    site = tmp_path / "site"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(Path(sweeps.__file__).resolve().parent, site / "sweeps", ignore=ignore)
    shutil.copytree(REPO / "conf", site / include["conf"], ignore=ignore)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)}
    probe = "import sweeps, sweeps.config as c; print(sweeps.__file__); print(c.conf_dir())"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=work, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    module_file, found = out.stdout.split()
    assert Path(module_file).is_relative_to(site)
    assert Path(found) == site / "sweeps" / "conf"
    job = subprocess.run(
        [sys.executable, "-m", "sweeps.run", "--cfg", "job", "optimizer=adam", "experiment=quick"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert job.returncode == 0, job.stderr
    cfg = OmegaConf.create(job.stdout)
    assert cfg.optimizer.name == "adam" and cfg.data.train_size == 2000


# -- a signal during composition -------------------------------------------------------------


def test_an_interrupt_wrapped_by_library_code_is_raised_as_the_interrupt():
    """What OmegaConf did with a SIGTERM landing in an attribute lookup: the interrupt came
    out as the context of an AttributeError inside a ConfigCompositionException."""
    from hydra.errors import ConfigCompositionException

    from sweeps.config import interrupt_in_chain, interrupts_unwrapped

    class Terminated(KeyboardInterrupt):
        pass

    signal_ = Terminated("received signal 15")
    with pytest.raises(Terminated) as e, interrupts_unwrapped():
        try:
            try:
                raise signal_
            except KeyboardInterrupt:
                raise AttributeError("x") from None  # __context__ keeps the interrupt
        except AttributeError as inner:
            raise ConfigCompositionException() from inner
    assert e.value is signal_
    with pytest.raises(ValueError), interrupts_unwrapped():  # other errors pass unchanged
        raise ValueError("bad value")
    assert interrupt_in_chain(ValueError("no interrupt")) is None
