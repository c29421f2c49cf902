"""sweeps.reproduce: a tiny recorded run comes back with identical metrics; changed config,
conf/, data digest and versions are each named."""

from __future__ import annotations

import shutil

import pytest
from omegaconf import OmegaConf

from sweeps import tracking
from sweeps.config import conf_dir, validate
from sweeps.diff import read_artifact_text
from sweeps.reproduce import main, reproduce
from sweeps.run import execute

TINY = [
    "data=synthetic",
    "trainer.epochs=2",
    "model.hidden_sizes=[16,16]",
    "mlflow.log_figures=false",
]


@pytest.fixture
def original(compose_cfg, mlflow_store):
    """One tiny run recorded the way sweeps.run records it; returns (store, run id)."""
    overrides = [
        *TINY,
        f"mlflow.tracking_uri={mlflow_store['uri']}",
        f"mlflow.artifact_root={mlflow_store['artifacts']}",
    ]
    dcfg = compose_cfg(overrides)
    outcome = execute(
        validate(dcfg), OmegaConf.to_container(dcfg, resolve=True), overrides, progress=False
    )
    return mlflow_store, outcome.run_id


def test_same_config_gives_identical_metrics(original):
    store, run_id = original
    r = reproduce(run_id, tracking_uri=store["uri"], progress=False)
    assert r.identical
    assert r.config == [] and r.conf_drift == []
    checked = {m.key: m.status for m in r.metrics}
    for key in (
        "val/acc",
        "val/loss",
        "train/loss",
        "train/acc",
        "train/batch_loss",
        "test/acc",
        "act/1/mean",
    ):
        assert checked[key] == "identical"
    assert checked["time/epoch"] == "wall clock"
    assert not [c for c in r.causes if c.kind in ("config", "data", "versions")]
    client = tracking.get_client(store["uri"])
    new = client.get_run(r.new.run_id)
    assert new.data.tags["reproduces"] == run_id
    assert new.data.tags["reproduce.identical"] == "true"
    assert new.info.experiment_id == r.original.experiment_id
    assert "IDENTICAL" in read_artifact_text(client, r.new.run_id, "reproduce.txt")
    assert r.new.config["model"]["hidden_sizes"] == [16, 16]


def test_changed_config_is_flagged_with_the_metrics_it_moved(original):
    store, run_id = original
    r = reproduce(run_id, ["optimizer.lr=0.2"], tracking_uri=store["uri"], progress=False)
    assert not r.identical
    assert [(c.key, c.a, c.b) for c in r.config] == [("optimizer.lr", 0.01, 0.2)]
    assert r.causes[0].kind == "config" and "optimizer.lr 0.01 -> 0.2" in r.causes[0].detail
    differs = {m.key for m in r.metrics if m.status == "differs"}
    assert {"val/loss", "train/batch_loss"} <= differs
    first = next(m for m in r.metrics if m.key == "train/batch_loss")
    assert first.first_step == 10  # the first logged batch loss already differs
    text = r.render()
    assert (
        "changed by the overrides given" in text
        and "config changed: optimizer.lr 0.01 -> 0.2" in text
    )
    assert "verdict: DIFFERENT" in text


def test_a_group_override_replaces_the_group(original):
    store, run_id = original
    r = reproduce(run_id, ["optimizer=adam"], tracking_uri=store["uri"], progress=False)
    assert {c.key for c in r.config} == {
        "optimizer.name",
        "optimizer.lr",
        "optimizer.beta1",
        "optimizer.beta2",
        "optimizer.eps",
    }
    assert r.new.tags["optimizer"] == "adam"
    assert not r.identical


def test_changed_conf_is_flagged_but_the_recorded_config_is_rerun(original, tmp_path):
    store, run_id = original
    conf = tmp_path / "conf"
    shutil.copytree(conf_dir(), conf)
    sgd = conf / "optimizer" / "sgd.yaml"
    sgd.write_text(sgd.read_text().replace("lr: 0.01", "lr: 0.05"))
    r = reproduce(run_id, tracking_uri=store["uri"], conf=conf, progress=False)
    assert [(c.key, c.a, c.b) for c in r.conf_drift] == [("optimizer.lr", 0.01, 0.05)]
    assert r.identical  # the recorded lr 0.01 ran, not the new default
    assert "conf/ changed: the recorded overrides now compose to a different config" in r.render()


def test_recorded_data_and_version_differences_are_named(original):
    store, run_id = original
    client = tracking.get_client(store["uri"])
    client.set_tag(run_id, "data_digest", "0000000000000000")
    client.set_tag(run_id, "numpy_version", "1.26.4")
    r = reproduce(run_id, tracking_uri=store["uri"], progress=False)
    kinds = {c.kind: c.detail for c in r.causes}
    assert kinds["data"].startswith("data_digest 0000000000000000 -> ")
    assert kinds["versions"].startswith("numpy_version 1.26.4 -> ")
    assert r.identical  # the tags were edited, not the data


def test_cli_exit_status(original, capsys):
    store, run_id = original
    assert main([run_id, "--tracking-uri", store["uri"], "--quiet"]) == 0
    assert "verdict: IDENTICAL" in capsys.readouterr().out
    assert main([run_id, "trainer.epochs=1", "--tracking-uri", store["uri"], "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "trainer" in out and "epochs: 2 -> 1" in out and "steps 2 vs 1" in out
    assert main(["0" * 32, "--tracking-uri", store["uri"], "--quiet"]) == 2
    assert main([run_id, "optimizer.lr=0.1,0.2", "--tracking-uri", store["uri"], "--quiet"]) == 2
    assert "sweep overrides" in capsys.readouterr().err
