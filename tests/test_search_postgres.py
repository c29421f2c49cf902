"""Two worker processes on one ``postgresql://`` study: the multi-machine setup, on loopback.

The server is started for the session (tests/pg.py). With CI=true the test never skips: a
missing server or driver fails it. Elsewhere it skips only when no PostgreSQL binaries (or no
psycopg) are installed.
"""

from __future__ import annotations

import contextlib
import os
import threading
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
def postgres_server():
    bindir = find_bindir()
    if bindir is None:
        _unavailable("no PostgreSQL server binaries (apt-get install -y postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("no PostgreSQL driver (pip install '.[postgres]')")
    server = PgServer(bindir)
    try:
        server.start()  # binaries are there: failing to start is a failure, never a skip
    except Exception as e:
        server.stop()
        pytest.fail(f"could not start PostgreSQL from {bindir}: {e}")
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server):
    return postgres_server.url


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


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_database_restart_does_not_stop_a_study(postgres_server, mlflow_store, caplog):
    """The server stops (its clients' connections end) and starts again 3 s later while two
    workers train: every process waits for it (the launcher's progress too), and the study
    completes as if nothing had happened. Before, a restart killed the launcher and both
    workers and left a trial RUNNING."""
    url = postgres_server.url
    args = tiny_args(url, mlflow_store, study="restart", rounds=[(16, "random")], epochs=5)
    args += ["n_workers=2", "progress=true"]
    seen: list[int] = []

    def restart_mid_study() -> None:
        study = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # the study is not there yet
                study = study or load_study(url, "restart")
                done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
                if len(done) >= 3:
                    seen.append(len(done))
                    postgres_server.halt()
                    time.sleep(3)
                    postgres_server.resume()
                    return
            time.sleep(0.1)

    restarter = threading.Thread(target=restart_mid_study)
    restarter.start()
    try:
        assert main(args) == 0
    finally:
        restarter.join()
    assert seen and seen[0] < 16  # the server was down while the study ran
    trials = check_invariants(url, mlflow_store, "restart", [16])
    assert [S.outcome_of(t) for t in trials] == ["complete"] * 16
    assert "the Optuna storage does not answer" in caplog.text  # the launcher waited
    assert "answers again" in caplog.text
