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
from sweeps import stores
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
    # A reservation under way when the server stopped lost the lock with its session: it
    # starts over, and the trial it had asked for is failed (not counted), never trained
    counted = [t for t in trials if S.outcome_of(t) in S.COUNTED]
    assert [S.outcome_of(t) for t in counted] == ["complete"] * 16
    for t in trials:
        if t not in counted:
            assert S.outcome_of(t) == "stale" and "lock" in t.user_attrs[S.REASON], t
    assert "worker exit codes" not in caplog.text  # no process died of the restart
    assert "the Optuna storage does not answer" in caplog.text  # the launcher waited
    assert "answers again" in caplog.text


@pytest.mark.postgres
def test_a_restart_ends_a_section_under_the_study_lock_in_lock_lost(postgres_server):
    """The server releases an advisory lock with its holder's session, and a restart ends
    every session: another process may take the lock while the holder still runs its
    section. The holder learns it at its next storage call that meets the outage (not made
    again without the lock), or at the section's end."""
    import sqlalchemy

    url = postgres_server.url
    lock, other = S.PgAdvisoryLock(url, "lost"), S.PgAdvisoryLock(url, "lost")
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    calls: list[int] = []

    def storage_call() -> int:
        calls.append(1)
        with engine.connect() as conn:
            return conn.execute(sqlalchemy.text("SELECT 1")).scalar()

    with pytest.raises(stores.LockLost, match="ended while it was held"), lock():
        postgres_server.halt()
        try:
            stores.retrying(storage_call, "Optuna storage")
        finally:
            postgres_server.resume()
    assert len(calls) == 1  # not called again: no waiting for a server that comes back

    with pytest.raises(stores.LockLost, match="ended while it was held"), lock():
        postgres_server.halt()
        postgres_server.resume()
        with other():  # free: the server released it with the holder's session
            assert storage_call() == 1

    with lock():  # the lock works again; a section that keeps it ends as usual
        assert storage_call() == 1


@pytest.mark.postgres
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_reservation_that_loses_the_study_lock_starts_over(
    postgres_server, mlflow_store, monkeypatch, caplog
):
    """The server restarts while a worker reserves a trial under the study lock: the trial
    it had asked for is failed (another worker may have taken its slot meanwhile, or
    failed it as a reservation that never finished) and the reservation starts over under
    a new lock. Before, it went on without the lock: in CI the other worker failed that
    trial meanwhile and this one crashed on it (UpdateFinishedTrialError)."""
    url = postgres_server.url
    search = S.Search(load_config(tiny_args(url, mlflow_store, study="relock")))
    restarted: list[int] = []
    real_suggest = S.suggest

    def suggest_during_a_restart(trial, space, ranges):
        if not restarted:
            restarted.append(trial.number)
            postgres_server.halt()
            postgres_server.resume()
        return real_suggest(trial, space, ranges)

    monkeypatch.setattr(S, "suggest", suggest_during_a_restart)
    res = search.reserve()
    assert restarted == [0]
    assert isinstance(res, S.Reservation) and res.trial.number == 1
    trials = load_study(url, "relock").trials
    assert trials[0].state == TrialState.FAIL and S.outcome_of(trials[0]) == "stale"
    assert "lost the study lock" in trials[0].user_attrs[S.REASON]
    assert trials[1].state == TrialState.RUNNING and trials[1].user_attrs[S.PID] == os.getpid()
    assert "reserving a trial: the study lock's database session ended" in caplog.text
    assert "starting over under a new lock" in caplog.text
    assert search.reserve().trial.number == 2  # and the next one as usual


@pytest.mark.postgres
def test_processes_opening_a_new_database_at_once_all_open_it(postgres_server):
    """Two machines launching on an empty database both create Optuna's tables: the one
    that loses the race opens it again instead of failing (seen in a test whose helper
    read the study while the launcher created it)."""
    from concurrent.futures import ThreadPoolExecutor

    errors: list[str] = []
    for n in range(3):
        name = f"fresh{n}"
        postgres_server._run(
            "createdb", "-h", "127.0.0.1", "-p", str(postgres_server.port), "-U", "postgres", name
        )
        url = postgres_server.url.rsplit("/", 1)[0] + f"/{name}"
        start = threading.Barrier(4)

        def open_it(url: str = url, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                S.open_storage(url, None, None)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {str(e).splitlines()[0]}")

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: open_it(), range(4)))
    assert errors == []
