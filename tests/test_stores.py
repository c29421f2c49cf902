"""Stores checked before any work: a tracking URI MLflow cannot open is a config error, and a
server that does not answer is an error in seconds, naming it. Servers here run on loopback."""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from sweeps import compare, diff, optuna_search, reproduce, sources, stores, tracking
from sweeps.config import MlflowConf


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def http_server(status: int) -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server answering every GET with ``status``; yields its URL and the
    paths it was asked for."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sqlite:///mlruns/mlflow.db", "sqlite"),
        ("postgresql+psycopg://u:pw@h/db", "postgresql"),
        ("HTTP://h:5000", "http"),
        ("databricks", "databricks"),
        ("mlruns", ""),
        ("file:./mlruns", ""),
        ("file:///tmp/mlruns", "file"),
    ],
)
def test_the_scheme_of_a_uri(uri, expected):
    assert stores.scheme(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:///mlruns/mlflow.db",
        "sqlite:////tmp/m.db?timeout=60",
        "postgresql://u:pw@db/mlflow",
        "postgresql+psycopg://u@db/mlflow",
        "mysql+pymysql://u@db/mlflow",
        "mssql+pyodbc://u@db/mlflow",
        "http://mlflow:5000",
        "https://mlflow.example/prefix",
        "databricks",
    ],
)
def test_a_store_mlflow_can_open_is_accepted(uri):
    stores.check_tracking_uri(uri)
    assert MlflowConf(tracking_uri=uri).tracking_uri == uri


@pytest.mark.parametrize(
    ("uri", "shown", "hint"),
    [
        ("ftp://u:secret@x/y", "'ftp://u:***@x/y'", ""),
        ("mlruns", "'mlruns'", "MLflow's file store"),
        ("file:///tmp/mlruns", "'file:///tmp/mlruns'", "MLflow's file store"),
        ("postgres://u@db/x", "'postgres://u@db/x'", ""),
    ],
)
def test_a_store_mlflow_cannot_open_is_a_config_error_naming_it(uri, shown, hint):
    with pytest.raises(ValueError) as e:
        MlflowConf(tracking_uri=uri)
    message = str(e.value)
    assert message.startswith(f"mlflow.tracking_uri {shown} is not a store MLflow can open")
    assert hint in message
    assert "sqlite:///mlruns/mlflow.db" in message and "http://host:5000" in message
    assert "secret" not in message


def test_a_tracking_server_that_answers_health_passes():
    for status in (200, 401, 403):  # 401/403: it wants the credentials MLflow sends
        with http_server(status) as (url, asked):
            stores.check_reachable(url, "MLflow tracking store")
            stores.check_reachable(url + "/", "MLflow tracking store")
        assert asked == ["/health", "/health"], status


def test_a_server_that_is_not_mlflow_is_an_error_naming_its_answer():
    with http_server(404) as (url, _), pytest.raises(stores.StoreError) as e:
        stores.check_reachable(url, "MLflow tracking store")
    assert str(e.value) == (
        f"the MLflow tracking store at {url} answers {url}/health with HTTP 404 Not Found: "
        "it is not an MLflow tracking server, or not a running one"
    )


def test_a_tracking_server_that_does_not_answer_is_an_error_in_seconds():
    url = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(stores.StoreError) as e:
        stores.check_reachable(url, "MLflow tracking store")
    assert time.monotonic() - start < stores.CONNECT_TIMEOUT
    assert str(e.value).startswith(f"the MLflow tracking store at {url} does not answer (")
    assert "refused" in str(e.value)
    port = url.rsplit(":", 1)[1]  # how to start one there, at its own port
    assert f"start it (mlflow server --host 127.0.0.1 --port {port} " in str(e.value)


def test_a_remote_tracking_server_that_does_not_answer_is_not_told_to_start_here():
    """A server on another machine: the error says to check it, not how to start one."""
    hint = stores._start_hint("https://tracking.internal:8443/mlflow")
    assert hint.startswith("check that it runs and that this machine reaches tracking.internal")
    assert "mlflow server" not in hint


def test_a_listening_server_that_never_answers_fails_after_the_timeout():
    with socket.socket() as s:  # accepts connections (the backlog) and never answers
        s.bind(("127.0.0.1", 0))
        s.listen()
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(stores.StoreError, match="does not answer .*timed out"):
            stores.check_reachable(url, "MLflow tracking store", timeout=0.5)
        assert time.monotonic() - start < 5


def test_a_local_files_folder_is_made_and_checked(tmp_path):
    db = tmp_path / "sub" / "m.db"
    stores.check_reachable(f"sqlite:///{db}?timeout=60", "MLflow tracking store")
    assert (tmp_path / "sub").is_dir() and not db.exists()  # the store makes the file
    stores.check_reachable("sqlite:///:memory:", "MLflow tracking store")
    taken = tmp_path / "a-file"
    taken.write_text("")
    with pytest.raises(stores.StoreError) as e:
        stores.check_reachable(f"sqlite:///{taken}/m.db", "MLflow tracking store")
    assert str(e.value) == (
        f"cannot make the folder of the MLflow tracking store at sqlite:///{taken}/m.db: "
        f"File exists ({taken})"
    )
    with pytest.raises(stores.StoreError, match=r"storage at sqlite:///.*sub is a folder, not"):
        stores.check_reachable(f"sqlite:///{tmp_path / 'sub'}", "Optuna storage")


def test_a_database_server_that_refuses_is_an_error_naming_it_without_its_password():
    pytest.importorskip("psycopg")  # the postgres extra; CI installs it
    port = closed_port()
    with pytest.raises(stores.StoreError) as e:
        stores.check_reachable(
            f"postgresql+psycopg://u:secret@127.0.0.1:{port}/db",
            "Optuna storage",
            shown=f"postgresql://u:secret@127.0.0.1:{port}/db",
        )
    message = str(e.value)
    assert message.startswith(
        f"cannot connect to the Optuna storage at postgresql://u:***@127.0.0.1:{port}/db: "
    )
    assert "refused" in message and "secret" not in message


def test_a_database_without_its_driver_is_an_error_naming_it():
    if importlib.util.find_spec("MySQLdb") is not None:
        pytest.skip("a MySQL driver is installed here")
    with pytest.raises(stores.StoreError) as e:
        stores.check_reachable("mysql://u@127.0.0.1/db", "MLflow tracking store")
    assert str(e.value).startswith(
        "no database driver for the MLflow tracking store at mysql://u@127.0.0.1/db: "
    )
    assert "MySQLdb" in str(e.value)


def test_a_search_with_an_unreachable_store_stops_before_the_study(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{closed_port()}"
    assert optuna_search.main([f"mlflow.tracking_uri={url}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the MLflow tracking store at {url} does not answer")
    made = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    assert made == {"mlruns", "mlruns/optuna"}  # the journal's folder: no journal, no store
    if importlib.util.find_spec("psycopg") is not None:
        storage = f"postgresql://u:pw@127.0.0.1:{closed_port()}/optuna"
        assert optuna_search.main([f"storage={storage}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: cannot connect to the Optuna storage at postgresql://u:***@")
        assert {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")} == made


def test_a_search_whose_journal_cannot_be_made_stops_before_the_study(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlruns").write_text("")  # where the default journal's folder would go
    assert optuna_search.main(["mlflow.enabled=false"]) == 2
    assert capsys.readouterr().err == (
        "error: cannot make the folder of the Optuna storage at mlruns/optuna/journal.log: "
        "Not a directory (mlruns/optuna)\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["mlruns"]


def test_a_search_with_a_uri_mlflow_cannot_open_is_a_config_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert optuna_search.main(["mlflow.tracking_uri=ftp://x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid search config: mlflow.tracking_uri 'ftp://x' is not a")
    assert list(tmp_path.iterdir()) == []


def test_an_experiment_runs_cannot_go_to_is_an_error_before_the_study(
    tmp_path, monkeypatch, capsys
):
    """A deleted experiment, or a non-default mlflow.artifact_root for an experiment that keeps
    its artifacts elsewhere (MLflow fixes the place when it creates the experiment): one line
    naming both, before the study is opened. The default root and the experiment's own pass."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = tracking.get_client(uri)
    client.delete_experiment(client.create_experiment("gone"))
    kept = (tmp_path / "kept").resolve()
    client.create_experiment("k", artifact_location=kept.as_uri())
    base = [f"mlflow.tracking_uri={uri}", "search.rounds=[{n_trials:1,sampler:random}]"]
    capsys.readouterr()  # MLflow's lines about making the store

    assert optuna_search.main([*base, "mlflow.experiment_name=gone"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: MLflow experiment 'gone' is deleted; restore it (mlflow experiments restore"
    )
    other = tmp_path / "other"
    assert (
        optuna_search.main([*base, "mlflow.experiment_name=k", f"mlflow.artifact_root={other}"])
        == 2
    )
    assert capsys.readouterr().err == (
        f"error: mlflow.artifact_root={other} cannot apply: MLflow experiment 'k' keeps its "
        f"artifacts in {kept.as_uri()}, set when it was created; drop the override or choose "
        "another mlflow.experiment_name\n"
    )
    assert not (tmp_path / "mlruns" / "optuna" / "journal.log").exists()  # no study opened
    for root in (stores.DEFAULT_ARTIFACT_ROOT, str(kept)):
        tracking.check_recording(uri, "k", root)  # no error
    assert MlflowClient(uri).search_runs([client.get_experiment_by_name("k").experiment_id]) == []


def test_a_store_that_stops_answering_after_the_reachability_check_is_one_clear_error(
    tmp_path, monkeypatch
):
    """A tracking server that goes down between the reachability check and the experiment
    lookup: a StoreError naming the store and the experiment, not MLflow's traceback."""
    from mlflow.exceptions import MlflowException

    uri = "http://user:secret@127.0.0.1:5999"

    class Down:
        def get_experiment_by_name(self, name):
            raise MlflowException(
                f"API request to {uri}/api/2.0/mlflow/experiments/get-by-name failed with "
                "exception HTTPConnectionPool(...): Max retries exceeded\nmore lines"
            )

    monkeypatch.setattr(tracking, "check_run_store", lambda uri, root: None)  # it answered
    monkeypatch.setattr(tracking, "get_client", lambda uri: Down())
    tracking._experiment_ids.clear()
    with pytest.raises(stores.StoreError) as e:
        tracking.check_recording(uri, "sweeps", stores.DEFAULT_ARTIFACT_ROOT)
    message = str(e.value)
    assert message.startswith(
        "the MLflow tracking store at http://user:***@127.0.0.1:5999 failed while opening "
        "experiment 'sweeps': API request to"
    )
    assert "Max retries exceeded" in message and "\n" not in message
    assert "secret" not in message


READERS = pytest.mark.parametrize(  # the commands that read runs, given a --tracking-uri
    "main",
    [
        lambda uri: compare.main(["--by", "optimizer", "--tracking-uri", uri, "--no-log"]),
        lambda uri: diff.main(["a", "b", "--tracking-uri", uri]),
        lambda uri: reproduce.main(["a", "--tracking-uri", uri]),
        lambda uri: sources.main(["--tracking-uri", uri]),
    ],
    ids=["compare", "diff", "reproduce", "sources"],
)


@READERS
def test_the_run_readers_check_their_store_first(main, capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    assert main(url) == 2
    assert capsys.readouterr().err.startswith(f"error: the MLflow tracking store at {url} does")
    assert main("mlruns") == 2
    assert capsys.readouterr().err.startswith("error: --tracking-uri 'mlruns' is not a store")


def test_a_local_artifact_folder_is_made_or_named(tmp_path):
    stores.check_artifact_root(str(tmp_path / "a" / "b"))
    stores.check_artifact_root((tmp_path / "c").as_uri())
    assert (tmp_path / "a" / "b").is_dir() and (tmp_path / "c").is_dir()
    stores.check_artifact_root("s3://bucket/artifacts")  # not ours to check
    taken = tmp_path / "a-file"
    taken.write_text("")
    with pytest.raises(stores.StoreError) as e:
        stores.check_artifact_root(str(taken / "art"))
    assert str(e.value) == (
        f"cannot make mlflow.artifact_root {taken}/art: Not a directory ({taken}/art)"
    )


@READERS
def test_the_run_readers_make_no_store_where_there_is_none(main, tmp_path, capsys):
    db = tmp_path / "typo" / "mlflow.db"
    assert main(f"sqlite:///{db}") == 2
    assert capsys.readouterr().err == (
        f"error: no MLflow store at sqlite:///{db}: {db} does not exist (record runs with "
        "sweeps.run first, or give --tracking-uri of a store that has them)\n"
    )
    assert list(tmp_path.iterdir()) == []


class _Clock:
    """``stores.time`` for ``retrying``: sleeps advance a fake clock at once."""

    def __init__(self) -> None:
        self.now, self.slept = 0.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _unreachable() -> Exception:
    """What a call through SQLAlchemy raises while the database server restarts, wrapped as
    Optuna and MLflow wrap it."""
    import sqlalchemy.exc

    try:
        try:
            raise sqlalchemy.exc.OperationalError(
                "SELECT 1", {}, Exception("the database system is shutting down")
            )
        except sqlalchemy.exc.OperationalError as e:
            raise RuntimeError("An exception is raised during the commit.") from e
    except RuntimeError as wrapped:
        return wrapped


def test_retrying_waits_for_a_database_that_comes_back(monkeypatch, caplog):
    clock = _Clock()
    monkeypatch.setattr(stores, "time", clock)
    monkeypatch.setattr(stores, "_answered_again", -float("inf"))  # restored after the test
    assert not stores.waited_within(60.0)
    calls = []

    def call(x):
        calls.append(x)
        if len(calls) < 4:
            raise _unreachable()
        return x * 2

    assert stores.retrying(call, "Optuna storage", 21) == 42
    assert len(calls) == 4 and clock.slept == [0.5, 1.0, 2.0]
    assert "the Optuna storage does not answer (the database system is shutting down)" in (
        caplog.text
    )
    assert "the Optuna storage answers again (3.5 s)" in caplog.text
    # the heartbeats others recorded meanwhile are late: not judged for a grace period
    assert stores.waited_within(60.0)
    clock.now += 61.0
    assert not stores.waited_within(60.0)


def test_retrying_gives_up_after_its_patience_and_never_retries_other_errors(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(stores, "time", clock)
    monkeypatch.setattr(stores, "PATIENCE", 10.0)
    calls = []

    def down():
        calls.append(1)
        raise _unreachable()

    with pytest.raises(RuntimeError, match="during the commit"):
        stores.retrying(down, "Optuna storage")
    assert clock.now <= 10.0 and sum(clock.slept) == clock.now and len(calls) == 5

    def refused():
        calls.append(2)
        raise ValueError("duplicate study name")

    with pytest.raises(ValueError, match="duplicate"):
        stores.retrying(refused, "Optuna storage")
    assert calls.count(2) == 1  # a fault of the request: at once


def test_retrying_inside_retrying_waits_once(monkeypatch):
    """A retried call that makes others (RDBStorage's methods call each other) is retried
    as a whole: the inner calls raise at once, so patience is not spent twice."""
    clock = _Clock()
    monkeypatch.setattr(stores, "time", clock)
    inner_calls = []

    def inner():
        inner_calls.append(1)
        if len(inner_calls) == 1:
            raise _unreachable()
        return "ok"

    assert stores.retrying(lambda: stores.retrying(inner, "x"), "x") == "ok"
    assert len(inner_calls) == 2 and clock.slept == [0.5]


def test_a_retried_call_under_a_lost_lock_is_not_made_again(monkeypatch):
    """Within ``guarding``, a call that meets the outage asks the guard first: a lock gone
    with the server's restart ends the call in LockLost, which no outer ``retrying`` waits
    on (waiting brings no lock back). While the guard passes, the call waits as usual."""
    clock = _Clock()
    monkeypatch.setattr(stores, "time", clock)
    calls, checks = [], []

    def check():  # the session answers twice, then is gone
        checks.append(1)
        if len(checks) > 2:
            raise stores.LockLost("the study lock's database session ended")

    def down():
        calls.append(1)
        raise _unreachable()

    with stores.guarding(check), pytest.raises(stores.LockLost, match="session ended"):
        stores.retrying(down, "Optuna storage")
    assert len(calls) == 3 and len(checks) == 3 and clock.slept == [0.5, 1.0]

    try:
        with stores.guarding(check):
            stores.retrying(down, "Optuna storage")
    except stores.LockLost as e:
        lost = e
    assert stores.transient(lost) is None  # its cause is transient, it is not

    def refused():
        raise ValueError("duplicate study name")

    checks.clear()
    with stores.guarding(check), pytest.raises(ValueError):
        stores.retrying(refused, "Optuna storage")
    assert checks == []  # only an outage asks about the lock
    # outside the scope: no guard any more
    calls.clear()
    monkeypatch.setattr(stores, "PATIENCE", 1.0)
    with pytest.raises(RuntimeError, match="during the commit"):
        stores.retrying(down, "Optuna storage")
    assert checks == [] and len(calls) == 2
