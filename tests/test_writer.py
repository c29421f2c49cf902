"""sweeps.writer: a search worker's MLflow writes made by a helper process, in order, with
nothing lost when the helper dies, a store error ending the run FAILED, and the helper
neither stopped by a Ctrl-C nor ending runs its worker left open."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

import children
from sweeps import tracking, writer


@pytest.fixture(autouse=True)
def _helper_ready(monkeypatch, tmp_path):
    """deferred_writes waits for its helper to start, so requests go to it; the writes a
    store refuses are kept under this test's folder (``writer.UNSENT_ROOT``)."""
    monkeypatch.setattr(writer, "WAIT_READY", True)
    monkeypatch.chdir(tmp_path)


def _open(store, **kw):
    return tracking.open_run(store["uri"], "w", store["artifacts"], **kw)


def _wait_gone(proc: subprocess.Popen, timeout: float = 60) -> None:
    proc.wait(timeout=timeout)


def test_a_runs_writes_go_through_the_helper_and_arrive_in_order(mlflow_store):
    client = MlflowClient(mlflow_store["uri"])
    with writer.deferred_writes(mlflow_store["uri"]) as w:
        with _open(mlflow_store, tags={"t": 1}) as run:
            assert isinstance(run.client, writer.DeferredClient)
            run.log_params({"lr": 0.1})
            for step in range(1, 4):
                run.queue_metrics([("val/acc", 0.1 * step, step)])
            run.queue_tags({"late": "yes"})
            rid = run.run_id
        # handed over, not necessarily made yet; made once drained
        assert w.drain(timeout=120)
        assert w.seconds > 0  # the helper's time in the store
        helper = w.proc
    _wait_gone(helper)  # the helper exits once its worker is done with it
    r = client.get_run(rid)
    assert r.info.status == "FINISHED" and r.info.end_time >= r.info.start_time
    assert r.data.params == {"lr": "0.1"}
    assert r.data.tags["late"] == "yes" and r.data.tags["t"] == "1"
    assert [m.value for m in client.get_metric_history(rid, "val/acc")] == pytest.approx(
        [0.1, 0.2, 0.3]
    )


def test_the_helper_creates_the_run_and_the_worker_learns_its_id_when_it_needs_it(
    mlflow_store, monkeypatch
):
    """The worker never calls the store to create its run (the helper may be holding the
    store's lock while it writes the previous trial): it names the run by a token, and
    learns the id and artifact URI from the helper's answer."""

    def refused(*args, **kwargs):
        raise AssertionError("the worker created a run itself")

    monkeypatch.setattr(MlflowClient, "create_run", refused)  # this process only
    before = int(time.time() * 1000)
    with writer.deferred_writes(mlflow_store["uri"]):
        with _open(mlflow_store, run_name="r1", tags={"t": 1}) as run:
            assert run.ref.startswith(writer.TOKEN)
            run.log_params({"lr": 0.1})
            run.log_text("hello", "notes/a.txt")  # by the helper, which knows where
            # a background job (figures): the id is resolved first, on this thread
            run.submit("notes/b.bin", run.log_bytes, b"xyz", "notes/b.bin")
            rid = run.run_id
            assert not rid.startswith(writer.TOKEN)
        assert run.run_id == rid  # still known once the writer forgot the token
    client = tracking.get_client(mlflow_store["uri"])
    r = client.get_run(rid)
    assert r.info.run_name == "r1" and r.data.tags["t"] == "1"
    assert r.info.status == "FINISHED" and r.data.params == {"lr": "0.1"}
    assert before <= r.info.start_time <= r.info.end_time  # stamped when asked, not made
    assert [f.path for f in client.list_artifacts(rid, "notes")] == ["notes/a.txt", "notes/b.bin"]


def test_a_run_the_store_refused_to_create_fails_its_block_with_the_reason(mlflow_store, caplog):
    with writer.deferred_writes(mlflow_store["uri"]) as w:
        client = writer.DeferredClient(tracking.get_client(mlflow_store["uri"]), w)
        token = client.create_run("424242", tags={}, run_name="nowhere")  # no such experiment
        client.log_batch(token, tags=[])
        with pytest.raises(RuntimeError, match="could not create the MLflow run: create_run:"):
            client.created_run(token)
        assert w.drain(timeout=120)
    assert "was not created" in caplog.text  # its later request: refused, and said so


def test_a_run_created_while_the_helper_hangs_is_made_here_when_it_dies(mlflow_store, caplog):
    with writer.deferred_writes(mlflow_store["uri"]) as w:
        os.kill(w.proc.pid, signal.SIGSTOP)
        with _open(mlflow_store) as run:
            run.log_params({"a": 1})
            run.log_text("x", "a.txt")
            assert run.ref.startswith(writer.TOKEN) and w._pending  # the create, unanswered
            os.kill(w.proc.pid, signal.SIGKILL)
            w.proc.wait()
            rid = run.run_id  # the helper is gone: the create is made here
    assert "makes them" in caplog.text
    client = tracking.get_client(mlflow_store["uri"])
    r = client.get_run(rid)
    assert r.info.status == "FINISHED" and r.data.params == {"a": "1"}
    assert [f.path for f in client.list_artifacts(rid)] == ["a.txt"]


def test_a_helper_that_does_not_create_the_run_in_time_is_stopped(
    mlflow_store, monkeypatch, caplog
):
    monkeypatch.setattr(writer, "ANSWER_TIMEOUT", 1.0)
    with writer.deferred_writes(mlflow_store["uri"]) as w:
        os.kill(w.proc.pid, signal.SIGSTOP)  # hung: alive, answering nothing
        with _open(mlflow_store) as run:
            run.log_params({"a": 1})
            rid = run.run_id  # waits 1 s, then stops the helper and makes its requests here
        assert w.proc.returncode == -signal.SIGKILL
    assert "has not created run" in caplog.text
    r = tracking.get_client(mlflow_store["uri"]).get_run(rid)
    assert r.info.status == "FINISHED" and r.data.params == {"a": "1"}


def test_until_the_helper_is_ready_requests_are_made_here_and_it_is_stopped(
    mlflow_store, monkeypatch
):
    """A study shorter than the helper's start (about 2.5 s) does not wait for it: its runs
    write themselves, and the helper, sent nothing, is stopped at the end."""
    monkeypatch.setattr(writer, "WAIT_READY", False)
    client = MlflowClient(mlflow_store["uri"])
    with writer.deferred_writes(mlflow_store["uri"]) as w:
        with _open(mlflow_store) as run:
            run.log_params({"lr": 0.1})
            assert client.get_run(run.run_id).data.params == {"lr": "0.1"}  # made at once
        assert not w._ready and not w._pending
        assert not w._local_runs  # its run ended: forgotten
    assert w.proc.returncode is not None
    assert client.get_run(run.run_id).info.status == "FINISHED"


def test_outside_deferred_writes_a_run_writes_itself(mlflow_store):
    with _open(mlflow_store) as run:
        assert not isinstance(run.client, writer.DeferredClient)
        run.log_params({"lr": 0.1})
    assert MlflowClient(mlflow_store["uri"]).get_run(run.run_id).data.params == {"lr": "0.1"}


def test_when_the_helper_dies_its_unanswered_requests_are_made_here(mlflow_store, caplog):
    client = MlflowClient(mlflow_store["uri"])
    with writer.deferred_writes(mlflow_store["uri"]) as w:
        with _open(mlflow_store) as run:
            os.kill(w.proc.pid, signal.SIGSTOP)  # these stay unanswered until it is killed
            run.log_params({"a": 1})
            run.queue_metrics([("m", 1.0, 1)])
            run.flush_metrics()
            assert w._pending
            os.kill(w.proc.pid, signal.SIGKILL)
            w.proc.wait()
            run.queue_metrics([("m", 2.0, 2)])  # after its death: made here
        assert w.drain(timeout=0)
    assert "stopped" in caplog.text and "makes them" in caplog.text
    r = client.get_run(run.run_id)
    assert r.info.status == "FINISHED" and r.data.params == {"a": "1"}
    assert [m.value for m in client.get_metric_history(run.run_id, "m")] == [1.0, 2.0]


def test_a_store_error_in_the_helper_ends_the_run_failed_with_the_reason(mlflow_store, caplog):
    client = MlflowClient(mlflow_store["uri"])
    with writer.deferred_writes(mlflow_store["uri"]), _open(mlflow_store) as run:
        run.log_params({"lr": 0.1})
        run.log_params({"lr": 0.2})  # MLflow refuses to change a logged param
        run.queue_metrics([("m", 1.0, 1)])
    r = client.get_run(run.run_id)
    assert r.info.status == "FAILED"
    reason = r.data.tags[tracking.FAILURE_TAG]
    assert reason.startswith("could not record it: log_batch:") and "lr" in reason
    kept = Path(writer.UNSENT_ROOT).resolve() / run.run_id
    assert f"what the store refused is kept in {kept}" in reason
    kept_json = json.loads((kept / "unsent.json").read_text())
    assert kept_json["params"] == {"lr": "0.2"} and kept_json["status"] == "FINISHED"
    assert [m.value for m in client.get_metric_history(run.run_id, "m")] == [1.0]
    assert "the store refused log_batch" in caplog.text


def test_a_helper_started_early_is_the_one_deferred_writes_takes(mlflow_store):
    """started_early starts the helper ahead (a launcher's setup overlaps its start); the
    next deferred_writes of the block takes it, and closes it."""
    client = MlflowClient(mlflow_store["uri"])
    with writer.started_early(mlflow_store["uri"]):
        early = writer._early[mlflow_store["uri"]]
        with writer.started_early(mlflow_store["uri"]):  # a second one starts nothing
            assert writer._early[mlflow_store["uri"]] is early
        with writer.deferred_writes(mlflow_store["uri"]) as w:
            assert w is early and w._ready  # WAIT_READY: waited for it
            assert mlflow_store["uri"] not in writer._early
            with _open(mlflow_store) as run:
                run.log_params({"lr": 0.1})
        _wait_gone(early.proc)
    assert client.get_run(run.run_id).data.params == {"lr": "0.1"}
    assert client.get_run(run.run_id).info.status == "FINISHED"


def test_a_helper_started_early_and_never_taken_is_stopped(mlflow_store, monkeypatch):
    monkeypatch.setattr(writer, "WAIT_READY", False)
    with writer.started_early(mlflow_store["uri"]):
        early = writer._early[mlflow_store["uri"]]
    assert mlflow_store["uri"] not in writer._early
    _wait_gone(early.proc, timeout=10)  # killed if still starting, else told to exit


def test_deferred_writes_cannot_nest_for_one_store(mlflow_store):
    with (
        writer.deferred_writes(mlflow_store["uri"]),
        pytest.raises(RuntimeError, match="already on"),
        writer.deferred_writes(mlflow_store["uri"]),
    ):
        pass


NO_MLFLOW_WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from sweeps import tracking, writer

    uri, artifacts = sys.argv[1], sys.argv[2]
    x, t = np.zeros((6, 4), np.float32), np.arange(6, dtype=np.int64)
    with writer.deferred_writes(uri) as w:
        with tracking.open_run(uri, "fresh", artifacts, run_name="lean", tags={"t": 1}) as run:
            ready = w._ready
            run.log_params({"lr": 0.1})
            run.log_texts({"config.yaml": "lr: 0.1\\n"})
            run.log_datasets([(x, t, "d-train", "abc123", "training")])
            run.queue_metrics([("val/acc", 0.5, 1), ("val/acc", 0.75, 2)])
            run.queue_tags({"late": "yes"})
    print(run.run_id, ready, "mlflow" in sys.modules, flush=True)
    """
)


def test_a_worker_that_has_not_imported_mlflow_never_does(mlflow_store, tmp_path):
    """A search worker hands every write of its run to its helper from the start, before
    the helper is ready, and builds no MLflow object itself: it never imports MLflow
    (about 2 s of CPU a process). The helper creates the run in the experiment named
    (new here), and everything arrives."""
    script = tmp_path / "worker.py"
    script.write_text(NO_MLFLOW_WORKER)
    out = subprocess.run(
        [sys.executable, str(script), mlflow_store["uri"], mlflow_store["artifacts"]],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    run_id, ready, imported = out.stdout.split()
    assert (ready, imported) == ("False", "False"), out.stderr
    client = MlflowClient(mlflow_store["uri"])
    r = client.get_run(run_id)
    assert client.get_experiment(r.info.experiment_id).name == "fresh"
    assert r.info.run_name == "lean" and r.info.status == "FINISHED"
    assert r.data.params == {"lr": "0.1"}
    assert r.data.tags["t"] == "1" and r.data.tags["late"] == "yes"
    history = client.get_metric_history(run_id, "val/acc")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]
    (given,) = r.inputs.dataset_inputs
    assert (given.dataset.name, given.dataset.digest) == ("d-train", "abc123")
    assert json.loads(given.dataset.profile)["features_shape"] == [6, 4]
    source = json.loads(given.dataset.source)["tags"]  # the worker's command, not its writer's
    assert source["mlflow.source.name"] == str(script)
    assert [f.path for f in client.list_artifacts(run_id)] == ["config.yaml"]


WORKER = textwrap.dedent(
    """
    import os, signal, sys, time
    from sweeps import tracking, writer

    uri, artifacts = sys.argv[1], sys.argv[2]
    writer.WAIT_READY = True
    with writer.deferred_writes(uri) as w:
        with tracking.open_run(uri, "w", artifacts) as run:
            run.log_params({"lr": 0.1})
            run.queue_metrics([("m", float(i), i) for i in range(1, 301)])
            run.flush_metrics()
            print(w.proc.pid, run.run_id, flush=True)
            if sys.argv[3] == "sigint":  # a Ctrl-C reaches the whole process group
                os.killpg(os.getpgrp(), signal.SIGINT)
            else:
                os.kill(os.getpid(), signal.SIGKILL)  # the worker dies, its run open
    """
)


@pytest.mark.parametrize("how", ["sigkill", "sigint"])
def test_the_helper_makes_what_it_was_sent_and_leaves_an_open_run_to_reconcile(
    mlflow_store, tmp_path, how
):
    """A killed worker: the helper makes every request it was sent, then exits, and the
    run it never saw ended stays RUNNING (``Search.reconcile_runs`` ends it KILLED, knowing
    its trial's state). A Ctrl-C to the process group: the helper ignores it; the worker
    ends its run KILLED through it, and the KILLED end arrives."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = children.popen(
        [sys.executable, str(script), mlflow_store["uri"], mlflow_store["artifacts"], how],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, for the SIGINT case
    )
    assert proc.stdout is not None
    helper_pid, run_id = proc.stdout.readline().split()
    proc.wait(timeout=120)
    deadline = time.monotonic() + 120
    while _alive(int(helper_pid)):
        assert time.monotonic() < deadline, "the helper did not exit"
        time.sleep(0.1)
    client = MlflowClient(mlflow_store["uri"])
    r = client.get_run(run_id)
    assert r.data.params == {"lr": "0.1"}
    assert len(client.get_metric_history(run_id, "m")) == 300
    if how == "sigkill":
        assert r.info.status == "RUNNING"
    else:
        assert r.info.status == "KILLED"
        assert r.data.tags[tracking.FAILURE_TAG].startswith("interrupted")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not reaped by its dead parent yet) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_the_writer_waits_for_a_database_store_that_restarts(monkeypatch):
    """A request the store's database could not take while it restarted is made again
    (``stores.retrying``), not recorded as the run's failure."""
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    from sweeps import stores

    monkeypatch.setattr(stores.time, "sleep", lambda s: None)

    class Client:
        tracking_uri = "postgresql://db/mlflow"

        def __init__(self) -> None:
            self.tags: list[tuple[str, str]] = []
            self.failures = 2

        def set_terminated(self, run_id, status, end_time):
            if self.failures:
                self.failures -= 1
                try:
                    raise sqlalchemy.exc.OperationalError("UPDATE runs", {}, Exception("gone"))
                except sqlalchemy.exc.OperationalError as e:
                    raise MlflowException(str(e)) from e
            self.tags.append((run_id, status))

    client = Client()
    applier = writer.Applier(client)
    assert applier.apply("set_terminated", ("r1", "FINISHED", 1), {}) == (None, None)
    assert client.tags == [("r1", "FINISHED")] and applier.failed == {}


def test_a_tracking_server_that_fails_its_health_check_is_not_waited_for(monkeypatch):
    """A writer asks a tracking server's health check (at most every HEALTH_SECONDS, and
    after a failed request) before its requests: while it fails, requests fail at once,
    without MLflow's minutes of retries; once it answers, they are made again."""
    from sweeps import stores

    health = {"up": True}
    checks: list[bool] = []

    def check(uri, what, timeout):
        checks.append(health["up"])
        if not health["up"]:
            raise stores.StoreError(f"the {what} at {uri} does not answer")

    clock = {"now": 0.0}
    monkeypatch.setattr(stores, "check_reachable", check)
    monkeypatch.setattr(writer.time, "monotonic", lambda: clock["now"])

    class Client:
        tracking_uri = "http://127.0.0.1:5999"

        def __init__(self) -> None:
            self.made: list[str] = []

        def set_terminated(self, run_id, status, end_time):
            self.made.append(run_id)

    client = Client()
    applier = writer.Applier(client)
    assert applier.apply("set_terminated", ("r1", "FINISHED", 1), {}) == (None, None)
    assert applier.apply("set_terminated", ("r2", "FINISHED", 1), {}) == (None, None)
    assert checks == [True]  # once in HEALTH_SECONDS while it answers
    health["up"] = False
    clock["now"] += writer.HEALTH_SECONDS
    error, _ = applier.apply("set_terminated", ("r3", "FINISHED", 1), {})
    assert error is not None and "does not answer" in error
    error, _ = applier.apply("set_terminated", ("r4", "FINISHED", 1), {})
    assert error is not None and "does not answer" in error  # asked again: failed before
    assert client.made == ["r1", "r2"] and checks == [True, False, False]
    health["up"] = True
    assert applier.apply("set_terminated", ("r5", "FINISHED", 1), {}) == (None, None)
    assert client.made == ["r1", "r2", "r5"]


@pytest.mark.parametrize(("chosen", "attempts"), [(None, 1 + writer.HELPER_RETRIES), ("1", 2)])
def test_the_helper_gives_up_on_a_failing_tracking_server_after_few_retries(
    monkeypatch, chosen, attempts
):
    """A tracking server that answers its health check but refuses a request (overloaded;
    a server that stopped refuses the connection, retried the same way): the helper tries
    it HELPER_RETRIES more times, not MLflow's default 7 (minutes of waits, which stalled
    every trial behind it), unless the user set MLFLOW_HTTP_REQUEST_MAX_RETRIES."""
    import http.server
    import threading

    calls: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            if self.path == "/health":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"OK")
                return
            calls.append(self.path)
            self.send_response(429)  # retried by every MLflow: the request was not processed
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")  # no waits in the test
    if chosen is None:
        monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", chosen)
    try:
        w = writer.StoreWriter(f"http://127.0.0.1:{server.server_port}", wait_ready=True)
        try:
            token = w.new_token()
            w.call("create_run", token, "0", 1, {}, None)
            with pytest.raises(RuntimeError, match="create_run"):
                w.created(token)
        finally:
            w.close()
    finally:
        server.shutdown()
        server.server_close()
    assert calls == ["/api/2.0/mlflow/runs/create"] * attempts
