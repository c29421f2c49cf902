"""sweeps.diff: exactly the changed keys, as a tree; choices, provenance and metric deltas."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from sweeps.config import validate
from sweeps.diff import ABSENT, Change, config_changes, diff_runs, main, render_tree, unflatten
from sweeps.run import execute

TINY = ["data=synthetic", "trainer.epochs=2", "model.hidden_sizes=[8]", "mlflow.log_figures=false"]


def test_config_changes_lists_exactly_the_changed_leaves():
    a = {
        "optimizer": {"name": "sgd", "lr": 0.01},
        "model": {"hidden_sizes": [100, 100], "bias": True},
        "trainer": {"epochs": 10, "iterations": None},
        "seed": 0,
        "dtype": "float32",
    }
    b = {
        "optimizer": {"name": "adam", "lr": 0.001, "beta1": 0.9},
        "model": {"hidden_sizes": [100, 50], "bias": True},
        "trainer": {"epochs": 10, "iterations": 2000},
        "seed": 0,
        "weight_decay": {"name": "l2"},
    }
    changes = config_changes(a, b)
    assert [(c.key, c.a, c.b) for c in changes] == [
        ("dtype", "float32", ABSENT),
        ("model.hidden_sizes", [100, 100], [100, 50]),
        ("optimizer.beta1", ABSENT, 0.9),
        ("optimizer.lr", 0.01, 0.001),
        ("optimizer.name", "sgd", "adam"),
        ("trainer.iterations", None, 2000),
        ("weight_decay", ABSENT, {"name": "l2"}),
    ]
    assert config_changes(a, a) == []
    assert [c.key for c in config_changes(a, b, ignore=("optimizer", "model"))] == [
        "dtype",
        "trainer.iterations",
        "weight_decay",
    ]


def test_values_compare_by_type_and_number():
    assert config_changes({"x": 1}, {"x": 1.0}) == []
    assert [c.key for c in config_changes({"x": True}, {"x": 1})] == ["x"]
    assert [c.key for c in config_changes({"x": "1"}, {"x": 1})] == ["x"]
    assert config_changes({"x": float("nan")}, {"x": float("nan")}) == []


def test_tree_rendering():
    changes = [
        Change(("seed",), 0, 1),
        Change(("optimizer", "lr"), 0.01, 0.001),
        Change(("optimizer", "beta1"), ABSENT, 0.9),
        Change(("model", "hidden_sizes"), [100, 100], [50]),
        Change(("a", "b", "c"), None, True),
        Change(("a", "d"), "x", ABSENT),
    ]
    assert render_tree(changes) == "\n".join(
        [
            "a",
            "  b",
            "    c: null -> true",
            "  d: x -> (absent)",
            "model",
            "  hidden_sizes: [100, 100] -> [50]",
            "optimizer",
            "  beta1: (absent) -> 0.9",
            "  lr: 0.01 -> 0.001",
            "seed: 0 -> 1",
        ]
    )


def test_unflatten():
    assert unflatten({"a.b": 1, "a.c": 2, "d": 3}) == {"a": {"b": 1, "c": 2}, "d": 3}


@pytest.fixture
def two_runs(compose_cfg, mlflow_store):
    def record(extra):
        overrides = [
            *TINY,
            *extra,
            f"mlflow.tracking_uri={mlflow_store['uri']}",
            f"mlflow.artifact_root={mlflow_store['artifacts']}",
        ]
        dcfg = compose_cfg(overrides)
        out = execute(
            validate(dcfg), OmegaConf.to_container(dcfg, resolve=True), overrides, progress=False
        )
        return out.run_id

    a = record(["optimizer=sgd", "seed=0"])
    b = record(["optimizer=adam", "trainer.epochs=3", "seed=1"])
    return mlflow_store, a, b


def test_diff_of_two_recorded_runs(two_runs):
    store, a, b = two_runs
    d = diff_runs(a, b, store["uri"])
    assert {c.key for c in d.config} == {
        "optimizer.name",
        "optimizer.lr",
        "optimizer.beta1",
        "optimizer.beta2",
        "optimizer.eps",
        "trainer.epochs",
        "seed",
    }
    assert d.a.config_source == d.b.config_source == "config.yaml"
    assert d.choices["optimizer"] == ("sgd", "adam")
    assert d.choices["init"] == ("he", "he")
    assert d.provenance["git_commit"][0] == d.provenance["git_commit"][1]
    assert (
        d.provenance["data_digest"][0] != d.provenance["data_digest"][1]
    )  # another seed, another split
    metrics = {m: (va, vb) for m, va, vb in d.metrics}
    assert metrics["val/acc"] == (d.a.metrics["val/acc"], d.b.metrics["val/acc"])
    text = d.render()
    assert "== config: 7 key(s) differ (A -> B) ==" in text
    assert "optimizer\n  beta1: (absent) -> 0.9\n" in text
    assert "seed: 0 -> 1" in text
    assert "optimizer     sgd -> adam" in text
    delta = metrics["val/acc"][1] - metrics["val/acc"][0]
    assert f"{delta:+.6g}" in text


def test_diff_of_a_run_with_itself_and_metric_filter(two_runs):
    store, a, _ = two_runs
    d = diff_runs(a, a, store["uri"], metrics=["val/*"])
    assert d.config == []
    assert [m for m, _, _ in d.metrics] == ["val/acc", "val/loss"]
    assert "(identical)" in d.render()


def test_cli(two_runs, capsys):
    store, a, b = two_runs
    assert main([a, b, "--tracking-uri", store["uri"], "--metrics", "test/*"]) == 0
    out = capsys.readouterr().out
    assert "trainer\n  epochs: 2 -> 3" in out
    assert "test/acc" in out and "val/acc" not in out
    assert main([a, "0" * 32, "--tracking-uri", store["uri"]]) == 2
    assert "error:" in capsys.readouterr().err
