"""``best_seeds=N``: the search's best configuration retrained with N seeds as child runs of
the study's parent run, with mean, std and 95% t-interval on the parent. Tiny synthetic
studies against a throwaway MLflow store; the statistics are recomputed here with scipy from
the child runs' own metrics."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow import MlflowClient
from scipy import stats

from search_helpers import EXPERIMENT, check_invariants, load_study, mlflow_runs, tiny_args
from sweeps import search as S
from sweeps.compare import compare
from sweeps.optuna_search import _stored_records, load_config, main


def _args(tmp_path, store, study: str, seeds: int) -> list[str]:
    args = tiny_args(
        str(tmp_path / "journal.log"), store, study=study, rounds=[(2, "random")], epochs=2
    )
    return [a for a in args if a != "evaluate_best=false"] + [f"best_seeds={seeds}"]


def _best_runs(store, study: str) -> list:
    return [r for r in mlflow_runs(store, study) if r.data.tags.get("sweeps.role") == "best-test"]


def _parent(tmp_path, store, study: str):
    s = load_study(str(tmp_path / "journal.log"), study)
    return MlflowClient(store["uri"]).get_run(s.user_attrs[S.PARENT_RUN])


def _t_summary(values) -> tuple[float, float, float, float]:
    """mean, sample std and the 95% t-interval, straight from scipy."""
    x = np.asarray(values, dtype=np.float64)
    low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    return float(x.mean()), float(x.std(ddof=1)), float(low), float(high)


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-3"])
def test_best_seeds_below_one_is_refused_naming_the_value(value):
    with pytest.raises(ValueError) as err:
        load_config([f"best_seeds={value}"])
    assert str(err.value) == (
        "best_seeds must be an integer >= 1 (how many seeds retrain the best configuration), "
        f"got {int(value)}"
    )


def test_bad_best_seeds_stops_the_command_before_any_work(tmp_path, mlflow_store, capsys):
    for value, detail in (
        ("0", "must be an integer >= 1"),
        ("abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("2.5", "Value '2.5' of type 'float' could not be converted to Integer"),
    ):
        args = _args(tmp_path, mlflow_store, "bad", 1)[:-1] + [f"best_seeds={value}"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "error: invalid search config" in err and detail in err
        assert f"best_seeds={value}" in err or f"got {value}" in err
    assert main([*_args(tmp_path, mlflow_store, "bad", 3), "evaluate_best=false"]) == 2
    assert "best_seeds=3 retrains the best configuration, which evaluate_best=false turns off" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "journal.log").exists()  # no study was opened
    assert mlflow_runs(mlflow_store, "bad") == []  # and no run was recorded
    assert load_config(["best_seeds=4"]).best_seeds == 4
    assert load_config([]).best_seeds == 1  # today's single retrain by default


# -- the retrain -----------------------------------------------------------------------------


def test_best_configuration_with_n_seeds_reports_mean_std_and_ci(tmp_path, mlflow_store, capsys):
    storage = str(tmp_path / "journal.log")
    args = _args(tmp_path, mlflow_store, "bs", 3)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "retrained with 3 seeds (0, 1, 2)" in out and "95% CI [" in out
    assert "compare its seed runs: python -m sweeps.compare" in out
    check_invariants(storage, mlflow_store, "bs", [2])  # nothing RUNNING, trials as before

    study = load_study(storage, "bs")
    best = study.best_trial
    parent = _parent(tmp_path, mlflow_store, "bs")
    assert parent.info.status == "FINISHED"
    runs = sorted(_best_runs(mlflow_store, "bs"), key=lambda r: int(r.data.tags["seed"]))
    assert [r.data.tags["seed"] for r in runs] == ["0", "1", "2"]
    assert [r.data.params["seed"] for r in runs] == ["0", "1", "2"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.tags["best_trial_number"] == str(best.number)
        assert r.data.tags["study"] == "bs"
    # seed 0 is the trial's own seed: its retrain reproduces the trial's score
    assert runs[0].data.metrics["val/acc"] == pytest.approx(best.value, abs=1e-12)

    m = parent.data.metrics
    for name in ("val/acc", "test/acc"):
        values = [r.data.metrics[name] for r in runs]
        mean, std, low, high = _t_summary(values)
        key = "best/" + name.replace("/", "_")
        assert m[f"{key}_mean"] == pytest.approx(mean, rel=1e-12)
        assert m[f"{key}_std"] == pytest.approx(std, rel=1e-9)
        assert (m[f"{key}_ci_low"], m[f"{key}_ci_high"]) == pytest.approx((low, high), rel=1e-9)
    assert m["best/test_acc"] == m["best/test_acc_mean"]
    assert (m["best/seeds_finished"], m["best/seeds_failed"]) == (3, 0)
    assert parent.data.tags["best_seeds"] == "0,1,2"

    # sweeps.compare selects the seed runs by their tags and gives the same interval
    c = compare(
        by=["study"],
        metric="test/acc",
        tracking_uri=mlflow_store["uri"],
        experiments=[EXPERIMENT],
        tags={"sweeps.role": "best-test", "study": "bs"},
    )
    (g,) = c.groups
    assert (g.label, g.n, g.seeds) == ("bs", 3, ("0", "1", "2"))
    assert (g.mean, g.ci_low, g.ci_high) == pytest.approx(
        (m["best/test_acc_mean"], m["best/test_acc_ci_low"], m["best/test_acc_ci_high"]), rel=1e-12
    )
    assert c.notes == []  # the seed runs differ in nothing but the seed

    # rerunning never retrains a finished seed: the same N trains nothing, a larger N only
    # the missing seeds, a smaller N reports on its first seeds
    before = {r.info.run_id for r in runs}
    assert main(args) == 0
    assert {r.info.run_id for r in _best_runs(mlflow_store, "bs")} == before
    assert main(args[:-1] + ["best_seeds=4"]) == 0
    after = _best_runs(mlflow_store, "bs")
    new = [r for r in after if r.info.run_id not in before]
    assert len(after) == 4 and [r.data.tags["seed"] for r in new] == ["3"]
    assert new[0].info.status == "FINISHED"
    assert _parent(tmp_path, mlflow_store, "bs").data.metrics["best/seeds_finished"] == 4
    assert main(args[:-1] + ["best_seeds=2"]) == 0
    assert len(_best_runs(mlflow_store, "bs")) == 4
    m2 = _parent(tmp_path, mlflow_store, "bs").data.metrics
    assert m2["best/seeds_finished"] == 2
    assert m2["best/test_acc_mean"] == pytest.approx(
        np.mean([r.data.metrics["test/acc"] for r in runs[:2]]), rel=1e-12
    )
    check_invariants(storage, mlflow_store, "bs", [2])


def test_a_failed_seed_is_reported_and_an_interrupt_leaves_nothing_running(
    tmp_path, mlflow_store, monkeypatch, capsys
):
    """Seed 1 raises (its run FAILED, recorded, not retried), seed 2 is interrupted (its run
    KILLED, the parent KILLED); the rerun trains seed 2 only."""
    import sweeps.run

    real_train = sweeps.run.train

    def faulty_train(cfg, *a, **kw):
        if cfg.seed == 1:
            raise RuntimeError("boom on seed 1")
        if cfg.seed == 2:
            raise KeyboardInterrupt("Ctrl-C on seed 2")
        return real_train(cfg, *a, **kw)

    storage = str(tmp_path / "journal.log")
    args = _args(tmp_path, mlflow_store, "bf", 3)
    monkeypatch.setattr(sweeps.run, "train", faulty_train)
    assert main(args) == 130
    assert "the seeds that finished are kept" in capsys.readouterr().err
    runs = {r.data.tags["seed"]: r for r in _best_runs(mlflow_store, "bf")}
    assert {s: r.info.status for s, r in runs.items()} == {
        "0": "FINISHED",
        "1": "FAILED",
        "2": "KILLED",
    }
    assert "boom on seed 1" in runs["1"].data.tags["sweeps.failure"]
    assert _parent(tmp_path, mlflow_store, "bf").info.status == "KILLED"
    assert not [r for r in mlflow_runs(mlflow_store, "bf") if r.info.status == "RUNNING"]
    stored = load_study(storage, "bf").user_attrs[S.BEST_TEST]["seeds"]
    assert {s: r["outcome"] for s, r in stored.items()} == {"0": "complete", "1": "failed"}

    monkeypatch.setattr(sweeps.run, "train", real_train)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "seed 1: failed: RuntimeError: boom on seed 1" in out
    assert "1 of 3 seeds failed; the statistics are over the 2 that finished" in out
    runs = _best_runs(mlflow_store, "bf")
    assert sorted(r.data.tags["seed"] for r in runs) == ["0", "1", "2", "2"]  # only 2 again
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["seed"] for r in finished) == ["0", "2"]
    parent = _parent(tmp_path, mlflow_store, "bf")
    assert parent.info.status == "FINISHED"
    m = parent.data.metrics
    assert (m["best/seeds_finished"], m["best/seeds_failed"]) == (2, 1)
    mean, std, low, high = _t_summary([r.data.metrics["test/acc"] for r in finished])
    assert (m["best/test_acc_mean"], m["best/test_acc_std"]) == pytest.approx((mean, std))
    assert (m["best/test_acc_ci_low"], m["best/test_acc_ci_high"]) == pytest.approx((low, high))
    check_invariants(storage, mlflow_store, "bf", [2])


def test_a_single_retrain_recorded_by_the_previous_version_counts_as_its_seed():
    old = {
        "trial": 4,
        "done": True,
        "value": 0.8,
        "retrained_value": 0.8,
        "test_acc": 0.7,
        "test_loss": 1.1,
        "run_id": "abc",
    }
    assert _stored_records(old, 4, 0, "val/acc") == {
        "0": {
            "seed": 0,
            "outcome": "complete",
            "run_id": "abc",
            "values": {"val/acc": 0.8, "test/acc": 0.7, "test/loss": 1.1},
        }
    }
    assert _stored_records(old, 5, 0, "val/acc") == {}  # another best trial: start again
    assert _stored_records({**old, "done": False}, 4, 0, "val/acc") == {}  # never finished
