"""sweeps.analysis: sweeps expand like Hydra's, runs are found by their resolved config, the
book's two non-training experiments reproduce the book's numbers, and the band statistics."""

from __future__ import annotations

import shlex
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from sweeps import analysis as A
from sweeps import tracking


def test_optimizer_paths_end_where_the_book_ends():
    # book.md, ch06/optimizer_compare_naive.py [rerun]: end points after 29 updates
    book = {
        "sgd": (-0.39, -0.09),
        "momentum": (0.81, 0.27),
        "adagrad": (-0.14, 0.00),
        "adam": (0.02, 0.32),
    }
    paths = A.optimizer_paths()
    for name, end in book.items():
        assert paths[name].shape == (30, 2)
        np.testing.assert_allclose(paths[name][0], (-7.0, 2.0))
        np.testing.assert_allclose(paths[name][-1], end, atol=0.006)


def test_activation_experiment_matches_the_book():
    t = A.activation_table().set_index(["activation", "init", "layer"]).sort_index()
    # sigmoid, std 1: 66-76% of values below 0.05 or above 0.95 in every layer
    sat = t.loc[("sigmoid", "std 1"), "saturated or zero"]
    assert (sat > 0.6).all() and (sat < 0.8).all()
    # sigmoid, std 0.01: all near 0.5 (std about 0.012); Xavier: std about 0.12
    assert t.loc[("sigmoid", "std 0.01", 5), "std"] < 0.02
    assert 0.08 < t.loc[("sigmoid", "Xavier", 5), "std"] < 0.16
    # ReLU mean, layer 1 -> 5: std 0.01 .040 -> 0; Xavier .40 -> .11; He .56 -> .62 (flat)
    relu = t.loc["relu", "mean"]
    assert relu[("std 0.01", 1)] == pytest.approx(0.040, abs=0.005)
    assert relu[("std 0.01", 5)] < 1e-4
    assert relu[("Xavier", 1)] == pytest.approx(0.40, abs=0.03)
    assert relu[("Xavier", 5)] == pytest.approx(0.11, abs=0.04)
    assert all(0.5 < relu[("He", k)] < 0.7 for k in range(1, 6))


def test_expand_is_the_overlay_sweep_with_overrides_winning():
    jobs = A.expand("optimizer_compare", ["optimizer=sgd,adam", "seed=3"])
    assert jobs == [
        ["experiment=optimizer_compare", "optimizer=sgd", "seed=3"],
        ["experiment=optimizer_compare", "optimizer=adam", "seed=3"],
    ]
    bn = A.expand("batchnorm_compare", ["seed=0,1"])
    assert len(bn) == 2 * 16 * 2
    assert len({tuple(j) for j in bn}) == len(bn)


def test_compose_jobs_equals_composing_each_job(compose_cfg):
    from omegaconf import OmegaConf

    jobs = A.expand(
        "batchnorm_compare",
        ["init.std=1.0,0.01", "seed=0,1", "data=synthetic", "data.synthetic_train=1000"],
    )
    composed = A.compose_jobs("batchnorm_compare", jobs)
    for job in composed:
        direct = OmegaConf.to_container(compose_cfg(job.overrides), resolve=True)
        direct["experiment"] = "batchnorm_compare"
        expected = {
            k: str(v)
            for k, v in tracking.flatten(direct).items()
            if not k.startswith(A.IGNORED_KEYS)
        }
        assert job.key == expected
        assert job.choices["batchnorm"] in ("on", "off") and job.choices["init"] == "std"
    stds = sorted({j.cfg.init.std for j in composed})
    assert stds == [0.01, 1.0]


def test_setting_from_env(tmp_path):
    quick = A.Setting.from_env({"SWEEPS_QUICK": "1"})
    assert quick.quick and quick.data == "synthetic" and "sweeps-quick-" in quick.tracking_uri
    assert "mlflow.log_figures=false" in quick.overrides
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    full = A.Setting.from_env({"SWEEPS_TRACKING_URI": uri, "SWEEPS_LAUNCH": "0"})
    assert not full.quick and full.data == "mnist" and full.tracking_uri == uri
    assert full.artifact_root == str(tmp_path / "artifacts") and not full.launch
    # the URI is read as the store reads it (tracking.sqlite_path): query, in-memory
    queried = A.Setting.from_env({"SWEEPS_TRACKING_URI": f"{uri}?timeout=60"})
    assert queried.artifact_root == str(tmp_path / "artifacts")
    assert A.study_storage(queried) == str(tmp_path / "optuna" / "journal.log")
    assert A.Setting.from_env({"SWEEPS_TRACKING_URI": "sqlite:///:memory:"}).artifact_root == (
        "mlruns/artifacts"
    )


def test_mean_band_uses_student_t_over_runs():
    h = pd.DataFrame(
        {
            "run_id": ["a", "a", "b", "b", "c", "c"],
            "step": [1, 2, 1, 2, 1, 2],
            "value": [1.0, 2, 2, 4, 3, 6],
        }
    )
    band = A.mean_band(h)
    assert band.loc[1, "mean"] == 2.0 and band.loc[2, "mean"] == 4.0 and (band["n"] == 3).all()
    half = 4.302652729911275 * 1.0 / np.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert band.loc[1, "high"] - 2.0 == pytest.approx(half)


def test_plot_band_legend_counts_runs():
    from matplotlib.figure import Figure

    h = pd.DataFrame(
        {
            "run_id": list("aabbcc"),
            "step": [1, 2] * 3,
            "value": np.arange(6.0),
            "optimizer": list("ssssaa"),
        }
    )
    ax = Figure().subplots()
    A.plot_band(ax, h, "optimizer", labels={"s": "SGD"})
    assert [t.get_label() for t in ax.get_lines()] == ["SGD (n=2)", "a (n=1)"]


@pytest.mark.slow
def test_runs_of_the_cli_are_found_and_missing_ones_launched(mlflow_store, tmp_path):
    """A run made by `python -m sweeps.run -m` is the run a notebook asks for: no retraining."""
    s = A.Setting(
        quick=True,
        tracking_uri=mlflow_store["uri"],
        artifact_root=mlflow_store["artifacts"],
        data="synthetic",
    )
    base = ["trainer.iterations=3", "model.hidden_sizes=[8,8]", "seed=0"]
    cli = A.command("optimizer_compare", [*base, "optimizer=sgd"], s)
    assert cli.startswith("python -m sweeps.run -m experiment=optimizer_compare")
    argv = shlex.split(cli)
    subprocess.run([sys.executable, *argv[1:]], check=True, cwd=tmp_path, capture_output=True)
    quick = [*base, "optimizer=sgd,adam"]
    with pytest.raises(LookupError, match="1 of 2 runs"):
        A.experiment_runs("optimizer_compare", quick, s, launch=False)
    runs = A.experiment_runs("optimizer_compare", quick, s)
    assert list(runs["optimizer"]) == ["sgd", "adam"]
    assert runs["tags.sweep_id"].iloc[0].startswith("sweep-")  # the CLI's run, not a new one
    assert runs["tags.sweep_id"].iloc[1].startswith("nb-")
    again = A.experiment_runs("optimizer_compare", quick, s, launch=False)
    assert list(again["run_id"]) == list(runs["run_id"])
    hist = A.metric_history(runs, "train/batch_loss", s)
    assert set(hist.columns) >= {"run_id", "step", "value", "optimizer", "seed"}
    assert hist.groupby("run_id").size().tolist() == [3, 3]


def test_match_takes_the_latest_equal_run_and_skips_keys_added_later():
    found = pd.DataFrame(
        {
            "run_id": ["old", "new", "other", "before_key"],
            "start_time": pd.to_datetime([1, 2, 3, 0], unit="s"),
            "params.seed": ["0", "0", "1", "0"],
            "params.trainer.new_key": ["x", "x", "x", None],
        }
    )
    assert A._match(found, {"seed": "0", "trainer.new_key": "x"})["run_id"] == "new"
    assert A._match(found, {"seed": "2"}) is None
    only_old = found[found["run_id"] == "before_key"]
    assert A._match(only_old, {"seed": "0", "trainer.new_key": "x"})["run_id"] == "before_key"
