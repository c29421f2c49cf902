"""A search worker's MLflow store writes, made by a helper process while it trains on.

MLflow's SQL store spends about 60 ms of CPU on a lean search trial's run (SQLAlchemy
objects and its latest-metric bookkeeping for every row; 35 ms of it the 241 metric rows),
12-15% of a book-protocol trial.
Made on a thread they hold the GIL against training (measured: no faster), so a search
worker hands them to a helper process of its own (``python -m sweeps.writer``), which makes
them in order while the worker's next trial trains: a trial's params, metrics, tags,
dataset inputs, text artifacts (its config and history) and end status
(``DeferredClient``). The helper creates the trial's run too: the trial names the run by a
stand-in (``TOKEN``) and learns its id from the helper's answer when it needs it, at its end
(for its Optuna record), so it never waits for the store, which the helper may be holding
while it writes the previous trial (a create_run in the trial measured 16 ms, 8 of them
waiting; with the create and the config upload at the trial's start moved to the helper, a
trial's MLflow calls went from 30 to 7 ms). The helper takes about 2.5 s to start. A worker
that has not imported MLflow sends it its requests from the start and builds no MLflow
object (the requests carry plain rows): it never imports MLflow itself, which took each
process about 2 s of CPU. A process that has (a launcher running its trials itself) makes
them itself until the helper is ready, so a short study does not wait for it.

Nothing is lost and nothing is reordered: a request stays pending in the worker until the
helper acknowledges it, and if the helper dies the worker makes the pending ones itself, in
order, and every later one (``StoreWriter``). A store error in the helper is kept for its
run: ending that run FINISHED ends it FAILED instead, with the error in ``sweeps.failure``
(the worker logs it too). The helper ignores SIGINT, SIGTERM and SIGHUP, which a Ctrl-C, a
stop or a closed terminal sends to the whole process group: it makes every request it was
sent, then exits once its worker closes the connection or dies. It never ends a run by
itself: a run whose worker died before ending it stays RUNNING until
``Search.reconcile_runs``, which knows its trial's state, ends it KILLED.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

from sweeps import stores

log = logging.getLogger(__name__)

#: where a worker keeps the writes the store refused for a run it created (``_keep``), and
#: a search trial's records its store missed (``sweeps.run.keep_unsent`` outside Hydra): a
#: folder per run, holding ``UNSENT_FILE`` (``sweeps.resend`` reads it)
UNSENT_ROOT = "mlruns/unsent"
UNSENT_FILE = "unsent.json"
FAILURE_TAG = "sweeps.failure"  # why a run ended FAILED (tracking.FAILURE_TAG is this one)
CLOSE_TIMEOUT = 600.0  # seconds a closing worker waits for its helper's last writes
WAIT_READY = False  # deferred_writes waits for its helper to start (tests set it)
TOKEN = "pending-run-"  # how a worker's requests name a run it asked its helper to create
ANSWER_TIMEOUT = 300.0  # seconds a worker waits for its helper to create a run, then stops it


def write_kept(folder: Path, kept: Mapping[str, Any]) -> None:
    """Write a run's kept records to ``folder / UNSENT_FILE`` whole or not at all (a
    launcher's ``Search.send_kept`` may read it at any time)."""
    tmp = folder / f".{UNSENT_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(kept) + "\n")
    os.replace(tmp, folder / UNSENT_FILE)


class ExperimentName(NamedTuple):
    """An experiment named for a deferred ``create_run``: the writer resolves it
    (``tracking.ensure_experiment``), so that a worker need not open the store itself."""

    name: str
    artifact_root: str


def batch_entities(metrics, params, tags) -> tuple[list, list, list]:
    """A deferred ``log_batch``'s rows as MLflow's entities: metrics (key, value, timestamp
    in ms, step), params and tags (key, value). Requests carry plain tuples, which a worker
    builds without importing MLflow (about 2 s of CPU per process)."""
    from mlflow.entities import Metric, Param, RunTag

    return (
        [Metric(*m) for m in metrics],
        [Param(*p) for p in params],
        [RunTag(*t) for t in tags],
    )


def log_inputs(client, run_id: str, inputs: list, attempts: int = 3) -> None:
    """``client.log_inputs``, tried again when another process inserted the same dataset."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, inputs)
            return
        except MlflowException as e:
            # The store records a dataset once per experiment: it looks it up, then inserts
            # it. Two workers logging the same new dataset at once both find none and the
            # second insert breaks the uniqueness constraint (seen with two workers' first
            # trials on a tracking server). Its transaction was rolled back; again, the
            # lookup finds the dataset.
            if not _duplicate_key(e):
                raise
            if attempt + 1 == attempts:  # every time: this run has these inputs already (a
                return  # request made again after its writer died before answering)
            time.sleep(0.05 * (attempt + 1))


def upload_texts(repo, texts: Mapping[str, str]) -> None:
    """Upload text artifacts ({path: text}) to an artifact repository in one request."""
    with tempfile.TemporaryDirectory() as tmp:
        for path, text in texts.items():
            file = Path(tmp, path)
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(text, encoding="utf-8")
        repo.log_artifacts(tmp)


def _duplicate_key(e: Exception) -> bool:
    """Whether a store error is a uniqueness violation (SQLite, PostgreSQL, MySQL wording)."""
    text = str(e).lower()
    return any(w in text for w in ("unique constraint", "uniqueviolation", "duplicate entry"))


#: seconds between two health checks of a tracking server by a writer (``Applier``)
HEALTH_SECONDS = 5.0
#: MLflow's retries of a helper's request to a tracking server (about 6 s of waits in all;
#: MLflow's default, 7, waits minutes), unless ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` is set
HELPER_RETRIES = 2


def helper_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The helper process's environment: ``environ`` with fewer MLflow retries of a request
    to a tracking server (``HELPER_RETRIES``) unless the user chose a number. A request in
    flight when the server stops otherwise waits through minutes of retries, and so does
    every trial after it (its run's end waits for the helper's answer): measured, a 48 s
    outage stopped a 40-trial search for 62 s. The helper keeps what the store refused
    (``StoreWriter._keep``), and the launcher sends it once the store answers."""
    env = dict(environ)
    env.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(HELPER_RETRIES))
    return env


class Applier:
    """Makes deferred requests on a client, remembering the runs it created (by their
    ``TOKEN``) and the runs a request failed for.

    A tracking server is first asked its health check (2 s at most; again after
    ``HEALTH_SECONDS``, or after a request failed): while it does not answer, requests
    fail at once instead of each waiting through MLflow's retries (about 4 minutes by
    default), and the worker keeps them for ``sweeps.resend`` (``StoreWriter._keep``)."""

    def __init__(self, client, created: dict[str, tuple[str, str]] | None = None) -> None:
        self.client = client
        self.created = {} if created is None else created  # token -> (run id, artifact uri)
        self.failed: dict[str, str] = {}  # run id or token -> its first failed request
        uri = getattr(client, "tracking_uri", "")
        self._server = uri if stores.is_server(uri) else None
        self._checked = -math.inf  # when the server's health was last asked
        self._down: stores.StoreError | None = None  # what it answered then

    def apply(self, op: str, args: tuple, kwargs: Mapping[str, Any]) -> tuple[str | None, Any]:
        """Make one request: (its error as text or None, its result: the (run id, artifact
        URI) of a run created, else None). ``args[0]`` names the run: its id or its token."""
        ref = args[0]
        try:
            down = self._server_down()
            if down is not None:
                raise down
            # made again while a database store restarts (``stores.retrying``; MLflow's
            # client retries a tracking server's requests itself)
            return None, stores.retrying(self._apply, "MLflow tracking store", op, args, kwargs)
        except Exception as e:
            self._checked = -math.inf  # ask the server's health before the next request
            error = f"{op}: {type(e).__name__}: {e}"
            self.failed.setdefault(ref, error)
            return error, None

    def _server_down(self) -> stores.StoreError | None:
        """A tracking server's health check error, or None (and None for other stores):
        asked at most every ``HEALTH_SECONDS``, and after a failed request."""
        if self._server is None:
            return None
        now = time.monotonic()
        if now - self._checked >= HEALTH_SECONDS:
            self._checked = now
            self._down = stores.server_down(self._server)
        return self._down

    def _apply(self, op: str, args: tuple, kwargs: Mapping[str, Any]) -> Any:
        """Make one request; its result (see ``apply``). Raises its error."""
        ref = args[0]
        if op == "create_run":
            experiment_id, start_time, tags, run_name = args[1:]
            if isinstance(experiment_id, ExperimentName):
                from sweeps.tracking import ensure_experiment

                name, root = experiment_id
                experiment_id = ensure_experiment(self.client, name, root, self.client.tracking_uri)
            run = self.client.create_run(
                experiment_id, start_time=start_time, tags=tags, run_name=run_name
            )
            self.created[ref] = (run.info.run_id, run.info.artifact_uri)
            return self.created[ref]
        run_id = self.run_id(ref)
        if op == "log_inputs":
            from sweeps.tracking import dataset_inputs

            log_inputs(self.client, run_id, dataset_inputs(args[1]))
        elif op == "set_terminated":
            status, end_time = args[1], args[2]
            if status == "FINISHED" and ref in self.failed:
                reason = (
                    f"could not record it: {self.failed[ref]}; what the store refused is kept "
                    f"in {Path(UNSENT_ROOT).resolve() / run_id} (python -m sweeps.resend)"
                )
                self.client.set_tag(run_id, FAILURE_TAG, reason[:5000])
                status = "FAILED"
            self.client.set_terminated(run_id, status=status, end_time=end_time)
            self.failed.pop(ref, None)
            self.created.pop(ref, None)  # the run's last request
        elif op == "log_batch":
            metrics, params, tags = batch_entities(*args[1:])
            self.client.log_batch(run_id, metrics, params, tags, synchronous=True)
        elif op == "log_texts":
            from mlflow.store.artifact.artifact_repository_registry import (
                get_artifact_repository,
            )

            texts, uri = args[1], args[2]
            if uri is None:
                uri = (
                    self.created[ref][1]
                    if ref in self.created
                    else self.client.get_run(run_id).info.artifact_uri
                )
            repo = get_artifact_repository(uri, tracking_uri=self.client.tracking_uri)
            upload_texts(repo, texts)
        else:
            raise ValueError(f"unknown request {op!r}")
        return None

    def run_id(self, ref: str) -> str:
        if not ref.startswith(TOKEN):
            return ref
        if ref not in self.created:
            raise LookupError(f"run {ref} was not created (see the create_run error before)")
        return self.created[ref][0]


class StoreWriter:
    """The worker's side: starts the helper, sends it requests, collects its answers.

    The helper takes about 2.5 s to start (it imports MLflow and opens the store). In a
    process that has imported MLflow already (a search's launcher, running its trials
    itself), requests are made here at once until the helper says it is ready, and so are
    those of a run that made a request before then, as with ``trial_writes=inline``: a
    short study does not wait for it, and a run is never split between two writers (its
    failed requests are known to the one that ends it). A process that has not (a search's
    worker) sends them to the helper from the start, which makes them once it is ready: the
    worker never imports MLflow, about 2 s of CPU, which four processes (two workers, their
    helpers) spent at once on a two-core machine, unless the helper dies (its requests are
    then made here) or the run needs the store itself (artifacts other than texts, reads).
    ``wait_ready``: block until the helper is ready (tests)."""

    def __init__(self, tracking_uri: str, wait_ready: bool = False) -> None:
        self.tracking_uri = tracking_uri
        ours, theirs = socket.socketpair()
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sweeps.writer", str(theirs.fileno()), tracking_uri],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=helper_env(os.environ),
            )
        self._conn = Connection(ours.detach())
        self._pending: dict[int, tuple[str, tuple, dict]] = {}
        self._sent = 0
        self._ready = False  # the helper said it can write
        self._gone = False  # the helper stopped: every request is made here
        self._here: Applier | None = None  # makes the requests made here
        self._local_runs: set[str] = set()  # runs with a request made here: all are
        self._created: dict[str, tuple[str, str]] = {}  # token -> (run id, artifact URI)
        self._create_errors: dict[str, str] = {}  # token -> why its run was not created
        # token -> the requests the store refused for its run, for ``refused`` (a run never
        # created) or ``_keep`` (at the run's end)
        self._refused: dict[str, list[tuple[str, tuple, dict]]] = {}
        self._tokens = 0
        self.seconds = 0.0  # the helper's time in the store, summed over its requests
        if wait_ready:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until the helper is ready, or gone."""
        while not self._ready and not self._gone:
            self._collect(None)

    def new_token(self) -> str:
        self._tokens += 1
        return f"{TOKEN}{os.getpid()}-{self._tokens}"

    def created(self, token: str) -> tuple[str, str]:
        """The (run id, artifact URI) of the run ``create_run`` was asked to make as
        ``token``, waiting for the helper's answer if need be (the helper makes requests in
        order: the run's create comes before the trial's writes). A helper that has not
        answered in ``ANSWER_TIMEOUT`` seconds is stopped, and its requests are made here.
        Raises RuntimeError if the store refused to create the run."""
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while token not in self._created and token not in self._create_errors:
            if self._gone:  # _helper_gone made the pending requests here
                break
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "the MLflow writer (pid %d) has not created run %s in %.0f s; stopping it",
                    self.proc.pid,
                    token,
                    ANSWER_TIMEOUT,
                )
                self.proc.kill()
                self.proc.wait()
                self._helper_gone()
                break
            self._collect(left)
        if token in self._created:
            return self._created[token]
        error = self._create_errors.get(token, "its request was never answered")
        raise RuntimeError(f"could not create the MLflow run: {error}")

    def refused(self, token: str) -> list[tuple[str, tuple, dict]]:
        """The requests (op, args, kwargs) made for ``token``'s run, whose creation the store
        refused, once every request sent so far is answered (those of a run that was never
        created fail at once, without the store); forgotten here."""
        self.drain()
        return self._refused.pop(token, [])

    def call(self, op: str, *args: Any, **kwargs: Any) -> None:
        """Have the store make ``op(*args, **kwargs)`` (see ``Applier.apply``)."""
        if not self._ready and not self._gone:
            self._collect(0.0)
        here_until_ready = not self._ready and "mlflow" in sys.modules
        if self._gone or here_until_ready or args[0] in self._local_runs:
            if not self._gone:  # once it is gone, every request is made here anyway
                self._local_runs.add(args[0])
            self._apply_here(op, args, kwargs)
            if op == "set_terminated":  # the run's last request: forget it
                self._local_runs.discard(args[0])
            return
        self._sent += 1
        self._pending[self._sent] = (op, args, kwargs)
        try:
            self._conn.send((self._sent, op, args, kwargs))
        except OSError:
            self._helper_gone()
            return
        self._collect(0.0)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until the store has made every request sent so far (``timeout`` seconds at
        most; None: no limit). True when it has."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._pending and not self._gone:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._collect(left)
        return True

    def close(self) -> None:
        """Wait for the last writes (up to ``CLOSE_TIMEOUT``), then let the helper exit; a
        helper still starting, which was sent nothing, is stopped. Interrupted meanwhile,
        the helper still makes every request it was sent."""
        try:
            if not self._ready and not self._gone and not self._pending:
                self.proc.kill()
            elif not self.drain(CLOSE_TIMEOUT):
                log.warning(
                    "the MLflow writer (pid %d) has %d request(s) left after %.0f s; it goes on "
                    "alone",
                    self.proc.pid,
                    len(self._pending),
                    CLOSE_TIMEOUT,
                )
        finally:
            self._conn.close()  # the helper exits at once (os._exit) once it has read the end
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5 if not self._pending else 0.1)

    def _collect(self, timeout: float | None) -> None:
        """Take the helper's messages that have arrived, waiting up to ``timeout`` seconds
        (None: no limit) for the first: its answers, and that it is ready (number 0)."""
        from sweeps.tracking import signals_held

        try:
            while self._conn.poll(timeout):  # a Ctrl-C may stop the wait
                with signals_held():  # not the read: half a message would break the stream
                    seq, error, seconds, result = self._conn.recv()
                timeout = 0.0
                if seq == 0:
                    self._ready = True
                    continue
                op, args, kwargs = self._pending.pop(seq)
                self.seconds += seconds
                self._answered(op, args, kwargs, error, result)
                if not self._pending:
                    return
        except (EOFError, OSError):
            self._helper_gone()

    def _helper_gone(self) -> None:
        self._gone = True
        self._local_runs.clear()
        if self._ready:
            log.warning(
                "the MLflow writer (pid %d) stopped (exit code %s) with %d request(s) "
                "unanswered; this process makes them and the later ones itself",
                self.proc.pid,
                self.proc.poll(),
                len(self._pending),
            )
        else:
            log.warning("the MLflow writer (pid %d) did not start; writing here", self.proc.pid)
        pending, self._pending = self._pending, {}
        for op, args, kwargs in pending.values():  # in the order they were sent
            self._apply_here(op, args, kwargs)

    def _apply_here(self, op: str, args: tuple, kwargs: Mapping[str, Any]) -> None:
        if self._here is None:
            from sweeps.tracking import get_client

            self._here = Applier(get_client(self.tracking_uri), self._created)
        error, result = self._here.apply(op, args, kwargs)
        self._answered(op, args, kwargs, error, result)

    def _answered(
        self, op: str, args: tuple, kwargs: Mapping[str, Any], error: str | None, result: Any
    ) -> None:
        ref = args[0]
        if op == "create_run":
            if result is not None:
                self._created[ref] = tuple(result)  # type: ignore[assignment]
            else:
                self._create_errors[ref] = error or "no answer"
        if error is not None:
            log.warning("MLflow run %s: the store refused %s", ref, error)
            if ref in self._created or ref in self._create_errors:  # kept for sweeps.resend
                self._refused.setdefault(ref, []).append((op, args, dict(kwargs)))
        if op == "set_terminated":  # the run's last request: forget its token
            created = self._created.pop(ref, None)
            self._create_errors.pop(ref, None)
            refused = self._refused.pop(ref, None)
            if refused and created is not None:
                self._keep(created[0], refused, status=args[1])

    def _keep(self, run_id: str, refused: list[tuple[str, tuple, dict]], status: str) -> None:
        """Write the requests the store refused for a run it created (its trial went on:
        the writes are not waited for) to ``mlruns/unsent/<run id>``, with the ``status``
        its worker ended it with, for ``sweeps.resend`` (and ``Search.reconcile_runs``,
        which names the folder)."""
        from sweeps import tracking

        folder = Path(UNSENT_ROOT) / run_id
        try:
            folder.mkdir(parents=True, exist_ok=True)
            kept = {
                "run_id": run_id,
                "tracking_uri": tracking.portable_uri(self.tracking_uri),
                **tracking.requests_kept(refused),
                "status": status,  # the worker's, not FAILED for the writes refused
            }
            kept["metrics"] = tracking.metric_dicts(kept["metrics"])
            write_kept(folder, kept)
        except OSError as e:
            log.warning("MLflow run %s: could not keep its refused writes: %s", run_id, e)
            return
        log.warning(
            "MLflow run %s: the store refused %d of its writes; they are kept in %s: "
            "python -m sweeps.resend %s",
            run_id,
            len(refused),
            folder.resolve(),
            folder.resolve(),
        )


class DeferredClient:
    """An ``MlflowClient`` whose run writes (``create_run``, ``log_batch``, ``log_inputs``,
    ``set_terminated``, ``log_texts``) go to a ``StoreWriter``; every other attribute is
    the client's, which is opened (MLflow imported) only when one is first asked for.
    ``create_run`` returns the run's token, which the other writes take as its id;
    ``created_run(token)`` gives the run's id and artifact URI. The writes take plain
    rows, not MLflow's entities (``batch_entities``, ``tracking.DatasetSpec``)."""

    def __init__(self, client, writer: StoreWriter) -> None:
        self._client = client  # None: opened when first needed
        self._writer = writer
        self.tracking_uri = writer.tracking_uri

    def __getattr__(self, name: str) -> Any:
        if self._client is None:
            from sweeps.tracking import get_client

            self._client = get_client(self.tracking_uri)
        return getattr(self._client, name)

    def create_run(
        self, experiment_id: str | ExperimentName, start_time=None, tags=None, run_name=None
    ) -> str:
        token = self._writer.new_token()
        start = start_time if start_time is not None else int(time.time() * 1000)  # now
        self._writer.call("create_run", token, experiment_id, start, dict(tags or {}), run_name)
        return token

    def created_run(self, token: str) -> tuple[str, str]:
        return self._writer.created(token)

    def refused(self, token: str) -> list[tuple[str, tuple, dict]]:
        return self._writer.refused(token)

    def log_texts(self, run_id, texts: Mapping[str, str], artifact_uri: str | None) -> None:
        """Upload text artifacts ({path: text}) to the run: by the writer, which knows the
        artifact URI of a run it created (the caller need not wait for it)."""
        self._writer.call("log_texts", run_id, dict(texts), artifact_uri)

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None) -> None:  # noqa: ARG002
        self._writer.call("log_batch", run_id, list(metrics), list(params), list(tags))

    def log_inputs(self, run_id, datasets=None) -> None:
        self._writer.call("log_inputs", run_id, list(datasets or []))

    def set_terminated(self, run_id, status=None, end_time=None) -> None:
        end = end_time if end_time is not None else int(time.time() * 1000)  # now, not later
        self._writer.call("set_terminated", run_id, status or "FINISHED", end)


_writers: dict[str, StoreWriter] = {}  # tracking URI -> this process's open writer
_early: dict[str, StoreWriter] = {}  # tracking URI -> a writer started ahead (started_early)


@contextlib.contextmanager
def started_early(tracking_uri: str) -> Iterator[None]:
    """Start the helper for ``tracking_uri`` now, for the next ``deferred_writes`` of this
    block to take: its 2.5 s start then overlaps this process's own setup (a search's
    launcher imports MLflow and opens the store too) rather than the first trials. One not
    taken by the end of the block is closed (stopped, if it is still starting)."""
    if tracking_uri in _writers or tracking_uri in _early:
        yield
        return
    writer = _early[tracking_uri] = StoreWriter(tracking_uri)
    try:
        yield
    finally:
        if _early.get(tracking_uri) is writer:
            del _early[tracking_uri]
            writer.close()


@contextlib.contextmanager
def deferred_writes(tracking_uri: str) -> Iterator[StoreWriter]:
    """While the block runs, runs opened on ``tracking_uri`` (``tracking.open_run``) make
    their writes through a helper process (the one ``started_early`` started, if any); at
    its end, wait for them."""
    if tracking_uri in _writers:
        raise RuntimeError(f"deferred writes to {tracking_uri} are already on")
    writer = _early.pop(tracking_uri, None)
    if writer is None:
        writer = StoreWriter(tracking_uri, wait_ready=WAIT_READY)
    elif WAIT_READY:
        writer.wait_ready()
    _writers[tracking_uri] = writer
    try:
        yield writer
    finally:
        del _writers[tracking_uri]
        writer.close()


def deferred(tracking_uri: str) -> DeferredClient | None:
    """A ``DeferredClient`` for ``tracking_uri`` while deferred writes to it are on; else
    None. Its own client is opened only if asked for (see ``DeferredClient``)."""
    writer = _writers.get(tracking_uri)
    return None if writer is None else DeferredClient(None, writer)


def drain_all(timeout: float | None = None) -> None:
    """Wait for this process's deferred writes so far, before reading what they wrote."""
    for writer in list(_writers.values()):
        if not writer.drain(timeout):
            log.warning("the MLflow writer (pid %d) is still busy", writer.proc.pid)


def main(argv: list[str] | None = None) -> int:
    """The helper: make each request received, in order, and answer it; stop at the end of
    the connection (its worker closed it, or died)."""
    argv = sys.argv[1:] if argv is None else argv
    # A Ctrl-C, a stop or a closed terminal reaches the whole process group: the helper
    # makes what it was sent, then ends with its connection.
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    conn = Connection(int(argv[0]))
    from sweeps.tracking import get_client

    applier = Applier(get_client(argv[1]))
    answering = True
    with contextlib.suppress(OSError):
        conn.send((0, None, 0.0, None))  # ready
    while True:
        try:
            seq, op, args, kwargs = conn.recv()
        except (EOFError, OSError):
            # Every request is made and committed; skip the interpreter's teardown (MLflow's
            # exit handlers took 0.8 s, which a closing worker would wait for).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        start = time.perf_counter()
        error, result = applier.apply(op, args, kwargs)
        if answering:
            try:
                conn.send((seq, error, time.perf_counter() - start, result))
            except OSError:  # the worker is gone: make what it sent, answer no more
                answering = False


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # sweeps.writer's own main, not this __main__ copy's: requests are unpickled as
    # instances of sweeps.writer's classes (ExperimentName), which the copy's would not match
    from sweeps.writer import main as writer_main

    raise SystemExit(writer_main())
