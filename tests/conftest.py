"""Shared fixtures: composed configs and throwaway MLflow stores.

Creating a fresh MLflow SQLite database runs its schema migrations (seconds), so one
template database is made per test session and copied for each test that needs a store.
"""

from __future__ import annotations

import os

# No network at test time: MLflow's usage telemetry is off where it sees CI=true, but a
# developer's plain `python -m pytest` would start its client when the test modules import
# MLflow (collection, before PYTEST_CURRENT_TEST is set) and fetch its config over the network.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import children
import servers
from sweeps.config import RunConfig, conf_dir, register_schemas, validate


@pytest.fixture(scope="session")
def compose_cfg() -> Callable[..., DictConfig]:
    """compose_cfg(["optimizer=adam", ...]) -> the composed DictConfig (no hydra section)."""
    register_schemas()

    def _compose(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            return compose(
                "config", overrides=list(overrides), return_hydra_config=return_hydra_config
            )

    return _compose


@pytest.fixture(scope="session")
def run_cfg(compose_cfg) -> Callable[..., RunConfig]:
    """run_cfg([...]) -> a validated RunConfig on tiny synthetic data, MLflow off, unless
    the overrides say otherwise."""

    def _make(overrides: Sequence[str] = ()) -> RunConfig:
        base = ["data=synthetic", "trainer.epochs=2", "mlflow.enabled=false"]
        return validate(compose_cfg([*base, *overrides]))

    return _make


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow-template")
    db = root / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    client.search_experiments()  # creates the schema
    return db


@pytest.fixture
def mlflow_store(tmp_path, _mlflow_template) -> dict[str, str]:
    """A fresh local store for one test: {"uri": sqlite URI, "artifacts": dir, "dir": root}."""
    root = tmp_path / "mlruns"
    root.mkdir()
    shutil.copy(_mlflow_template, root / "mlflow.db")
    return {
        "uri": f"sqlite:///{root / 'mlflow.db'}",
        "artifacts": str(root / "artifacts"),
        "dir": str(root),
    }


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    """A command started through ``children.popen`` and still running when its test ends
    is killed (a failed assertion must not leave a 100000-epoch run training)."""
    yield
    children.kill_leftovers()


@pytest.fixture
def mlflow_server(tmp_path, _mlflow_template) -> Iterator[dict[str, str]]:
    """``mlflow server`` on loopback over a copy of the template store: how machines share
    one tracking store (``servers.start_mlflow``; ``servers.stop_mlflow(store)`` takes it
    down in the middle of a test)."""
    store = servers.start_mlflow(tmp_path / "server", _mlflow_template)
    yield store
    servers.stop_mlflow(store)
