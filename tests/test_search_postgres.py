"""Two worker processes on one ``postgresql://`` study: the multi-machine setup, on loopback.

The server is started for the session (tests/pg.py). With CI=true the test never skips: a
missing server or driver fails it. Elsewhere it skips only when no PostgreSQL binaries (or no
psycopg) are installed.
"""

from __future__ import annotations

import os
import time

import pytest
from optuna.trial import TrialState

from pg import PgServer, find_bindir
from search_helpers import check_invariants, load_study, tiny_args
from sweeps import search as S
from sweeps.optuna_search import load_config, main

IN_CI = os.environ.get("CI") == "true"


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true, so the PostgreSQL test must run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_url():
    bindir = find_bindir()
    if bindir is None:
        _unavailable("no PostgreSQL server binaries (apt-get install -y postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("no PostgreSQL driver (pip install '.[postgres]')")
    server = PgServer(bindir)
    try:
        url = server.start()  # binaries are there: failing to start is a failure, never a skip
    except Exception as e:
        server.stop()
        pytest.fail(f"could not start PostgreSQL from {bindir}: {e}")
    yield url
    server.stop()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_two_workers_on_a_postgresql_study(postgres_url, mlflow_server, capfd):
    """The multi-machine setup on one machine: the study in PostgreSQL, the runs on an MLflow
    tracking server; the same invariants as with the local defaults. MLflow's client prints
    no URL for each run it ends there (two lines a trial, from the workers' writers)."""
    mlflow_store = mlflow_server
    args = tiny_args(
        postgres_url,
        mlflow_store,
        study="pg",
        rounds=[(5, "random"), (4, "tpe")],
        extra=["n_workers=2"],
    )
    assert main(args) == 0
    out = capfd.readouterr().out
    assert "View run" not in out and "MLflow parent run" in out
    trials = check_invariants(postgres_url, mlflow_store, "pg", [5, 4])
    assert S.tally(trials).failed == 0
    assert all(t.user_attrs[S.PID] != os.getpid() for t in trials)  # trained in the workers

    # heartbeats are on: a trial whose worker vanished on "another machine" is failed by
    # Optuna once its heartbeat is older than the grace period, and its slot runs again
    search = S.Search(load_config([*args, "heartbeat_interval=1", "grace_period=2"]))
    ghost = search.study.ask()
    ghost.set_user_attr(S.ROUND, 2)
    ghost.set_user_attr(S.HOST, "another-machine")
    ghost.set_user_attr(S.PID, 1)
    search.storage.record_heartbeat(ghost._trial_id)
    time.sleep(3.5)
    with search.lock():
        assert search.fail_stale() == [ghost.number]
    trial = load_study(postgres_url, "pg").trials[ghost.number]
    assert trial.state == TrialState.FAIL and S.outcome_of(trial) == "stale"
    check_invariants(postgres_url, mlflow_store, "pg", [5, 4])
