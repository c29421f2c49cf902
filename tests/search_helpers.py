"""Helpers shared by the search tests: tiny search commands and the study invariants."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

import children
from sweeps import search as S

EXPERIMENT = "sweeps-search"


def tiny_args(
    storage: str,
    store: dict[str, str],
    *,
    study: str = "s",
    rounds: Sequence[tuple[int, str]] = ((3, "random"), (3, "tpe")),
    epochs: int = 3,
    extra: Sequence[str] = (),
) -> list[str]:
    """``search=book`` shrunk to synthetic data, a 16-unit MLP and a few epochs."""
    rounds_text = ",".join(f"{{n_trials:{n},sampler:{s}}}" for n, s in rounds)
    return [
        "search=book",
        f"study_name={study}",
        f"storage={storage}",
        f"search.rounds=[{rounds_text}]",
        "search.params.lr.high=1.0",
        f"mlflow.tracking_uri={store['uri']}",
        f"mlflow.artifact_root={store['artifacts']}",
        "mlflow.log_figures=false",
        "mlflow.log_model=false",
        "progress=false",
        "poll_interval=0.2",
        "evaluate_best=false",
        "data=synthetic",
        f"trainer.epochs={epochs}",
        "model.hidden_sizes=[16]",
        *extra,
    ]


def storage_of(spec: str):
    return S.open_storage(spec, heartbeat_interval=20, grace_period=60)


def load_study(spec: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage_of(spec))


def spawn(args: Sequence[str], cwd: Path, log: Path) -> subprocess.Popen:
    """The search command in its own process, output to ``log``."""
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return children.popen(
            [sys.executable, "-m", "sweeps.optuna_search", *args],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the search exited ({proc.returncode}) before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def mlflow_runs(store: dict[str, str], study: str) -> list:
    client = MlflowClient(store["uri"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.study = '{study}'")


SIGNAL_MARGIN = 0.3  # seconds


def running_trial_with_run(spec: str, store: dict[str, str], study: str, min_counted: int) -> bool:
    """A trial is training (its MLflow run is RUNNING) after ``min_counted`` counted ones,
    with at least ``SIGNAL_MARGIN`` seconds left if it takes as long as the shortest
    complete trial: a signal sent now still finds it training (one near its end could
    finish between this poll and the signal: seen, once trials got faster)."""
    try:
        trials = load_study(spec, study).get_trials(deepcopy=False)
    except KeyError:  # the study does not exist yet
        return False
    if S.tally(trials).counted < min_counted:
        return False
    # complete trials only: a diverged one fails in its first epochs (lr up to 1.0 here)
    durations = [
        t.duration.total_seconds()
        for t in trials
        if t.state == TrialState.COMPLETE and t.duration is not None
    ]
    if not durations:
        return False
    now = datetime.datetime.now()
    running = {
        str(t.number)
        for t in trials
        if t.state == TrialState.RUNNING
        and t.datetime_start is not None
        and (now - t.datetime_start).total_seconds() < min(durations) - SIGNAL_MARGIN
    }
    return any(
        r.info.status == "RUNNING" and r.data.tags.get("trial_number") in running
        for r in mlflow_runs(store, study)
    )


def check_invariants(spec: str, store: dict[str, str], study: str, budgets: Sequence[int]) -> list:
    """Exact budget per round, nothing RUNNING (Optuna and MLflow), no parameter set trained
    twice, and every trained trial a child run of the study's parent run."""
    s = load_study(spec, study)
    trials = s.get_trials(deepcopy=False)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], "trials left RUNNING"
    for r, budget in enumerate(budgets, 1):
        assert S.tally(trials, r).counted == budget, (
            f"round {r}: {S.tally(trials, r)} for a budget of {budget}"
        )
    counted = [t for t in trials if S.outcome_of(t) in S.COUNTED]
    keys = [json.dumps(sorted(t.params.items())) for t in counted]
    assert len(keys) == len(set(keys)), "a parameter set was trained twice"
    for t in trials:
        if t.state == TrialState.FAIL:
            assert S.outcome_of(t) in ("failed", "interrupted", "stale", "duplicate"), t.user_attrs
            if S.OUTCOME in t.user_attrs:  # else failed by Optuna's heartbeat check
                assert t.user_attrs.get(S.REASON), f"trial {t.number} failed without a reason"

    parent = s.user_attrs[S.PARENT_RUN]
    runs = mlflow_runs(store, study)
    assert not [
        r.info.run_id for r in runs if r.info.status == "RUNNING" and r.info.run_id != parent
    ]
    by_trial: dict[int, list] = {}
    for r in runs:
        if r.data.tags.get("sweeps.role") == "trial":
            assert r.data.tags["mlflow.parentRunId"] == parent
            by_trial.setdefault(int(r.data.tags["trial_number"]), []).append(r)
    states = {"complete": "COMPLETE", "pruned": "PRUNED", "failed": "FAIL"}
    for t in counted:
        assert len(by_trial.get(t.number, [])) == 1, (
            f"trial {t.number} has runs {by_trial.get(t.number)}"
        )
        run = by_trial[t.number][0]
        assert run.data.tags["trial_state"] == states[S.outcome_of(t)]
        assert run.data.tags["round"] == str(t.user_attrs[S.ROUND])
    return trials
