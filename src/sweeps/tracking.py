"""MLflow recording: the run lifecycle and the training callback.

``open_run`` creates (or resumes) an MLflow run with the resolved config as params and the
group choices, seed, sweep id, git state and version as tags, and guarantees a truthful end
status: FINISHED, FAILED with the reason, or KILLED on Ctrl-C/SIGTERM. Nothing is left
RUNNING.

``MlflowCallback`` keeps tracking off the training hot path. It buffers the per-iteration
losses and the per-epoch metrics in the run and sends them at most every
``METRICS_FLUSH_SECONDS`` (each store write commits a transaction, which costs more than a
whole epoch of a small net); whatever is buffered is sent before the run ends, however it
ends. It draws and uploads its figures and weights on the run's background thread
(``Run.submit``): the final ones overlap the test evaluation and the run's last writes, and
``open_run`` waits for them before it ends the run FINISHED; the histograms at
initialization are waited for before training starts (drawing them alongside training cost
more than drawing them). ``NullRun`` has the same interface and does
nothing, so callers never branch on whether tracking is on.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import importlib
import io
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import sweeps
from sweeps import procs, stores, writer
from sweeps.locks import flock
from sweeps.stores import DEFAULT_ARTIFACT_ROOT, StoreError, check_run_store, redact, sqlite_path
from sweeps.train import Callback, DivergedError, History

log = logging.getLogger(__name__)

FAILURE_TAG = writer.FAILURE_TAG  # the reason a run ended FAILED or KILLED
PROCESS_TAG = "host_process"  # procs.process_id() of the process that made the run
HOST_TAG = "host_name"  # the host name of the machine that made the run
MACHINE_TAG = "host_machine"  # its procs.machine_id(): an earlier boot, not another machine
BACKGROUND_GRACE = 60.0  # seconds a failed run waits for its artifacts before it is ended
METRICS_FLUSH_SECONDS = 5.0  # buffered metrics reach the store at least this often
PROBE_SECONDS = 60.0  # a lost tracking server is asked this often whether it is back


class TrackingLost(RuntimeError):
    """The tracking store stopped answering during a run and did not answer again by its
    end: what the run made is kept on disk instead (``sweeps.run``). ``outcome``: what the
    finished training gave (``sweeps.run.Outcome``), ``kept``: the folder."""

    def __init__(self, message: str, outcome: Any = None, kept: Path | None = None) -> None:
        super().__init__(message)
        self.outcome, self.kept = outcome, kept


class ArtifactError(RuntimeError):
    """Drawing or uploading an artifact on a run's background thread failed."""


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM so the run can end as KILLED. ``signum``: the
    signal to pass on to child processes (``procs.stop_children``)."""

    signum = signal.SIGTERM


_received: list[int] = []  # signals turned into exceptions by sigterm_as_interrupt's handlers


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into a ``Terminated`` exception while the block runs; SIGINT raises
    KeyboardInterrupt as by default. Both are also recorded, and ``raise_if_interrupted``
    (``InterruptCheck``: after every batch) raises again one that was swallowed on its way
    out: raised inside a finalizer (``__del__``, a weakref callback), an exception only
    prints "Exception ignored in ..." and the run would train on."""

    def on_sigterm(signum, frame):  # noqa: ARG001
        _received.append(signum)
        raise Terminated(f"received signal {signum}")

    def on_sigint(signum, frame):
        _received.append(signum)
        signal.default_int_handler(signum, frame)

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:  # not a handler someone else chose
        signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)
        _received.clear()


def raise_if_interrupted() -> None:
    """Raise the interrupt (``Terminated`` for SIGTERM) of a signal received inside
    ``sigterm_as_interrupt`` whose exception has not ended the block: one swallowed."""
    if _received:
        signum = _received[-1]
        detail = f"received signal {signum}; its first exception was swallowed"
        raise Terminated(detail) if signum == signal.SIGTERM else KeyboardInterrupt(detail)


class InterruptCheck(Callback):
    """``raise_if_interrupted`` after every batch, every epoch's evaluation and training
    (see ``sigterm_as_interrupt``)."""

    def on_batch_end(self, iteration: int, loss: float) -> None:
        raise_if_interrupted()

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], model) -> None:
        raise_if_interrupted()

    def on_train_end(self, history: History, model) -> None:
        raise_if_interrupted()


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Deliver SIGINT and SIGTERM only once the block is done.

    A KeyboardInterrupt raised inside MLflow's SQLAlchemy store can leave a SQLite statement
    open, and the database locked for every later write: the run could not be marked KILLED
    and stayed RUNNING. So store calls are not interrupted; a second signal during one is
    delivered at once (the store may hang).
    """
    # Keyed by int: the handlers are called with the plain int signal number.
    previous: dict[int, Any] = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: h for s, h in previous.items() if h is not None}  # None: not from Python
    if threading.current_thread() is not threading.main_thread() or not previous:
        yield
        return
    received: list[tuple[int, Any]] = []

    def hold(signum, frame):
        received.append((signum, frame))
        if len(received) > 1:
            _restore_and_deliver(previous, received[-1:])

    for s in previous:
        signal.signal(s, hold)
    try:
        yield
    finally:
        if len(received) <= 1:  # more: already restored and delivered by `hold`
            _restore_and_deliver(previous, received)


def _restore_and_deliver(handlers: Mapping[int, Any], received: list[tuple[int, Any]]) -> None:
    for s, h in handlers.items():
        signal.signal(s, h)
    for signum, frame in received:
        handler = handlers[signum]
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optimizer": {"lr": 0.1}} -> {"optimizer.lr": 0.1}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_state(path: Path | None = None) -> dict[str, str]:
    """Commit and dirty flag of the source checkout the package runs from, if any. Asked of
    git once per process and folder (two subprocesses, about 10 ms): the code a process runs
    is the code it imported, so a search's trials share one answer."""
    return dict(_git_state(path or Path(sweeps.__file__).resolve().parent))


@functools.cache
def _git_state(where: Path) -> dict[str, str]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return {"git_commit": "unknown", "git_dirty": "unknown"}
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {
            "git_commit": commit.stdout.strip(),
            "git_dirty": str(bool(status.stdout.strip())).lower(),
        }
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


def dataset_source(tags: Iterable[tuple[str, str]] | None = None):
    """The source recorded with a run's datasets: what ``mlflow.data.from_numpy`` records by
    default (the command, the user, the commit: ``source_tags``, this process's unless
    given). Left to itself, from_numpy runs MLflow's run-context providers for every
    dataset, which open the checkout with GitPython: 2 ms a dataset, 260 ms for the first,
    and a Ctrl-C that landed in a GitPython ``Repo.__del__`` was swallowed there
    ("Exception ignored in"), so the run trained on."""
    from mlflow.data.code_dataset_source import CodeDatasetSource

    return CodeDatasetSource(dict(source_tags() if tags is None else tags))


@functools.cache
def source_tags() -> tuple[tuple[str, str], ...]:
    """This process's command, user and commit, as MLflow tags (built once)."""
    tags = {
        "mlflow.source.name": os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else "",
        "mlflow.source.type": "LOCAL",
    }
    with contextlib.suppress(KeyError, OSError):  # no user name (some containers)
        tags["mlflow.user"] = getpass.getuser()
    commit = git_state()["git_commit"]
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tuple(tags.items())


class DatasetSpec(NamedTuple):
    """What MLflow records of a dataset given its digest (``dataset_inputs``): its name,
    digest and context (training, validation), its features' and targets' shape and dtype
    (for the schema and the profile), and its source (``dataset_source``: this process's
    command, user and commit). A worker sends this to its writer process, not the arrays;
    the source is the worker's, not the writer's."""

    name: str
    digest: str
    context: str
    features: tuple[tuple[int, ...], str]  # shape, dtype
    targets: tuple[tuple[int, ...], str]
    source: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, x: np.ndarray, t: np.ndarray, name: str, digest: str, context: str) -> DatasetSpec:
        shapes = (x.shape, x.dtype.str), (t.shape, t.dtype.str)
        return cls(name, digest, context, *shapes, source_tags())


def dataset_inputs(specs: Iterable[DatasetSpec]) -> list:
    """MLflow's dataset inputs (``mlflow.data.from_numpy``) for ``specs``, as the arrays
    themselves would give: from_numpy reads only their shapes and dtypes when the digest
    is given, so it is handed arrays of that shape that hold a single value."""
    # mlflow.data.from_numpy itself, from its own module: mlflow.data attaches it with
    # setattr at import time, which mypy cannot see.
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.entities import DatasetInput, InputTag

    def stand_in(shape: tuple[int, ...], dtype: str) -> np.ndarray:
        one = np.zeros(1, dtype=np.dtype(dtype))
        return np.lib.stride_tricks.as_strided(one, shape, (0,) * len(shape), writeable=False)

    return [
        DatasetInput(
            from_numpy(
                stand_in(*s.features),
                source=dataset_source(s.source),
                targets=stand_in(*s.targets),
                name=s.name,
                digest=s.digest,
            )._to_mlflow_entity(),
            tags=[InputTag("mlflow.data.context", s.context)],
        )
        for s in specs
    ]


def local_store_paths(tracking_uri: str) -> None:
    """Make sure the folder of a local SQLite store exists."""
    db = sqlite_path(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def search_all_runs(client, experiment_ids: list[str], filter_string: str) -> list:
    """Every run of ``experiment_ids`` that ``filter_string`` matches, page after page."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def get_client(tracking_uri: str):
    """A client whose store is ready. A local SQLite store is created (tables and migrations)
    under a lock beside the database file: two processes opening a new store at once would
    otherwise race to create the same tables, and one of them fail. Once this process has
    opened the store, later calls skip the lock (MLflow caches the store; its tables exist):
    another process opening it meanwhile (a search worker's writer process, about 2 s) does
    not hold up a trial's run (0.55 s seen)."""
    from mlflow import MlflowClient

    local_store_paths(tracking_uri)
    db = sqlite_path(tracking_uri)
    # A server, another database or SQLite in memory has no file to prepare; a store this
    # process opened before is ready.
    if db is None or db in _opened:
        return MlflowClient(tracking_uri=tracking_uri)
    # MLflow's SQL store takes about 1 s to import: not while holding the lock. (Were its
    # module to move, MlflowClient below imports whatever it uses, under the lock.)
    with contextlib.suppress(ImportError):
        importlib.import_module("mlflow.store.tracking.sqlalchemy_store")
    with flock(Path(f"{db}.init.lock")):
        client = MlflowClient(tracking_uri=tracking_uri)  # builds (and caches) the store
        write_ahead_log(db)
        _opened.add(db)
        return client


_opened: set[Path] = set()  # local stores this process has opened (and put in WAL mode)


def write_ahead_log(db: Path) -> None:
    """Put a local SQLite store in write-ahead-log mode (a property of the file, kept once
    set). In SQLite's default rollback-journal mode every commit syncs the journal, the
    database and the folder: MLflow's run bookkeeping (create, params, tags, end; a commit
    each) cost about 150 ms per run here, about 60 ms in WAL mode. Readers (``mlflow ui``,
    a notebook) then no longer block a run's writes either. A committed write survives a
    crash or a kill of the process as before. The store must be on a local disk (WAL needs
    shared memory; SQLite over a network file system is unsafe in any mode)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(db, timeout=10)) as con:
            (mode,) = con.execute("PRAGMA journal_mode").fetchone()
            if mode.lower() != "wal":
                con.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError as e:  # busy (an open reader): stay in the current mode
        log.info("could not switch %s to WAL mode: %s", db, e)


def copy_store(src: Path, dst: Path) -> None:
    """Copy a local SQLite store consistently (SQLite's backup API: a WAL-mode database's
    recent commits may still be in its -wal file, which a file copy would miss)."""
    import sqlite3

    with (
        contextlib.closing(sqlite3.connect(src)) as a,
        contextlib.closing(sqlite3.connect(dst)) as b,
    ):
        a.backup(b)


def ensure_experiment(client, name: str, artifact_root: str, tracking_uri: str) -> str:
    """Experiment id for ``name``, created with artifacts under ``artifact_root`` for a local
    store (a tracking server decides its own artifact location). Safe against a concurrent
    creator. An active experiment's id is remembered for the process (a search's trials all
    go to one experiment: one query less per trial)."""
    key = (tracking_uri, name, artifact_root)
    if key in _experiment_ids:
        return _experiment_ids[key]
    exp_id = _ensure_experiment(client, name, artifact_root, tracking_uri)
    _experiment_ids[key] = exp_id
    return exp_id


_experiment_ids: dict[tuple[str, str, str], str] = {}


def check_recording(tracking_uri: str, name: str, artifact_root: str) -> None:
    """``StoreError`` unless runs can be recorded into experiment ``name`` as configured,
    checked before any work by every command that records runs: the store and its artifact
    folder (``stores.check_run_store``), then the experiment, where ``ensure_experiment``
    would refuse later (it is deleted, or an ``artifact_root`` other than the default is
    asked of an experiment that keeps its artifacts elsewhere: MLflow fixes the place when
    it creates the experiment). Creates the experiment if it is new, as the run would."""
    check_run_store(tracking_uri, artifact_root)
    try:
        ensure_experiment(get_client(tracking_uri), name, artifact_root, tracking_uri)
    except ValueError as e:
        raise StoreError(str(e)) from None
    except Exception as e:  # it answered check_run_store, then stopped (a server going down)
        first = first_line(e).replace(tracking_uri, redact(tracking_uri))  # no password
        raise StoreError(
            f"the MLflow tracking store at {redact(tracking_uri)} failed while opening "
            f"experiment {name!r}: {first}"
        ) from None


def _ensure_experiment(client, name: str, artifact_root: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage != "active":
        raise ValueError(
            f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore "
            f"--experiment-id {exp.experiment_id}) or choose another mlflow.experiment_name"
        )
    local = not tracking_uri.startswith(("http://", "https://"))
    if exp is not None:
        if local and artifact_root != DEFAULT_ARTIFACT_ROOT:
            asked = Path(artifact_root).resolve().as_uri()
            if asked != exp.artifact_location:
                raise ValueError(
                    f"mlflow.artifact_root={artifact_root} cannot apply: MLflow experiment "
                    f"{name!r} keeps its artifacts in {exp.artifact_location}, set when it "
                    "was created; drop the override or choose another mlflow.experiment_name"
                )
        return exp.experiment_id
    location = Path(artifact_root).resolve().as_uri() if local else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        exp = client.get_experiment_by_name(name)  # another process created it first
        if exp is None:
            raise
        return exp.experiment_id


class Background:
    """One worker thread that runs a run's artifact jobs (drawing and uploading figures,
    writing weights) in the order they were submitted. A job's exception is kept, never
    dropped: ``error`` returns the first one, naming the artifact."""

    def __init__(self, name: str) -> None:
        self._pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._jobs: list[tuple[str, futures.Future]] = []

    def submit(self, path: str, fn: Callable[..., Any], *args: Any) -> futures.Future:
        job = self._pool.submit(fn, *args)
        self._jobs.append((path, job))
        return job

    def error(self) -> ArtifactError | None:
        """The first job that has failed so far, or None."""
        for path, job in self._jobs:
            if job.done() and not job.cancelled() and job.exception() is not None:
                e = job.exception()
                err = ArtifactError(f"could not log {path}: {type(e).__name__}: {e}")
                err.__cause__ = e
                return err
        return None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (None: no limit) for every job; then stop the thread
        (dropping jobs not started). True when every job ran."""
        _, pending = futures.wait([job for _, job in self._jobs], timeout)
        self._pool.shutdown(wait=not pending, cancel_futures=True)
        return not pending

    def cancel(self) -> None:
        """Drop the jobs not started yet and return at once; a job already running finishes
        on its own (the interpreter joins the thread at exit)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def portable_uri(uri: str) -> str:
    """``uri`` with a relative SQLite path made absolute: a kept folder is resent from
    anywhere."""
    db = stores.sqlite_path(uri)
    return f"sqlite:///{db.resolve()}" if db is not None and not db.is_absolute() else uri


def portable_root(experiment: writer.ExperimentName) -> str:
    """An experiment's local artifact root made absolute (a URI is left as it is)."""
    root = experiment.artifact_root
    return root if "://" in root else str(Path(root).resolve())


def metric_dicts(rows: Iterable[tuple[str, float, int, int]]) -> list[dict[str, Any]]:
    """Metric rows (key, value, timestamp in ms, step) as a kept folder's JSON holds them."""
    keys = ("key", "value", "timestamp", "step")
    return [dict(zip(keys, m, strict=True)) for m in rows]


def requests_kept(requests: Sequence[tuple[str, tuple, dict]]) -> dict[str, Any]:
    """What the store refused of a run's requests, handed over to a writer process (its
    creation included, for a run it never created: ``writer.StoreWriter.refused``), as
    ``sweeps.resend`` takes them: how to create it (``create``: experiment, start time,
    tags, name), its params, dataset inputs (as MLflow's JSON), metric rows (key, value,
    ms, step), tags, text artifacts and the status it was to end with. Its experiment is
    the one its worker named (``experiment_name`` and ``artifact_root``), or its id."""
    from google.protobuf.json_format import MessageToDict

    kept: dict[str, Any] = {"metrics": [], "tags": {}, "params": {}, "inputs": [], "texts": {}}
    for op, args, _ in requests:
        if op == "create_run":
            _, experiment, start, tags, name = args
            where = (
                # the root absolute, as its worker meant it: resend may run from elsewhere
                {"experiment_name": experiment.name, "artifact_root": portable_root(experiment)}
                if isinstance(experiment, writer.ExperimentName)
                else {"experiment_id": experiment}
            )
            kept["create"] = {**where, "start_time": start, "tags": tags, "run_name": name}
        elif op == "log_batch":
            _, metrics, params, tags = args
            kept["metrics"] += [tuple(m) for m in metrics]
            kept["params"].update(dict(params))
            kept["tags"].update(dict(tags))
        elif op == "log_inputs":
            kept["inputs"] += [MessageToDict(d.to_proto()) for d in dataset_inputs(args[1])]
        elif op == "log_texts":
            kept["texts"].update(args[1])
        elif op == "set_terminated":
            kept["status"] = args[1]
    return kept


class Run:
    """An open MLflow run: thin helpers over MlflowClient for one run id.

    With deferred writes (a search worker's), the run is created by the worker's writer
    process: ``ref`` is then a stand-in for its id (``writer.TOKEN``), which the store calls
    take, and ``run_id`` waits for the real one."""

    def __init__(self, client, run_id: str, artifact_uri: str | None = None) -> None:
        self.client = client
        self.ref = run_id
        self._run_id = None if run_id.startswith(writer.TOKEN) else run_id
        self._artifact_uri = artifact_uri
        self._background: Background | None = None
        self._metrics: list[tuple[str, float, int, int]] = []  # (key, value, ms, step) unsent
        self._tags: dict[str, str] = {}  # queued, unsent
        self._held: list[tuple[str, float, int, int]] = []  # sent only at the end (hold_metrics)
        self._sent = time.monotonic()
        #: the store's failure during training (``flush_metrics``), until it answers again,
        #: or at the run's end (``send_last``)
        self.lost: Exception | None = None
        self._given_up = False  # the store failed at the end, or ``online`` asked it again
        self._probed = 0.0  # when a lost server was last asked whether it is back
        self._resumed = False  # the store answers again: check what it kept before sending
        #: a deferred run whose creation the store refused: the requests handed over for it
        #: (``online`` learns it; ``unsent`` keeps them)
        self.uncreated: list[tuple[str, tuple, dict]] | None = None

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            self._run_id, self._artifact_uri = self.client.created_run(self.ref)
        return self._run_id

    @functools.cached_property
    def _artifacts(self):
        """The run's artifact repository. MlflowClient's artifact calls look the run up in
        the store first (a get_run, 11-13 ms here, for every new run) to learn what
        create_run already returned."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        run_id = self.run_id  # resolved first: a deferred create gives the artifact URI too
        uri = self._artifact_uri or self.client.get_run(run_id).info.artifact_uri
        return get_artifact_repository(uri, tracking_uri=self.client.tracking_uri)

    # -- artifacts logged on the background thread

    def submit(self, path: str, fn: Callable[..., Any], *args: Any) -> futures.Future:
        """Run ``fn(*args)``, which logs the artifact ``path``, on this run's background thread
        (one thread, jobs in order); returns its future. ``open_run`` waits for every job
        before it ends the run FINISHED, and ends it FAILED if one raised. A job must not
        write to the tracking store (metrics, params, tags stay on the caller's thread);
        artifact uploads are fine."""
        if self._background is None:
            # resolved here, on the caller's thread (a deferred create's answer comes over
            # the writer's connection, which is not for two threads): the jobs only read it
            self._artifacts  # noqa: B018
            self._background = Background(f"mlflow-artifacts-{self.run_id[:8]}")
        return self._background.submit(path, fn, *args)

    def check_background(self) -> None:
        """Raise the first background failure so far (``ArtifactError``)."""
        err = self._background.error() if self._background is not None else None
        if err is not None:
            raise err

    def wait_background(self, timeout: float | None = None) -> bool:
        """Wait for the background jobs (see ``Background.wait``); True when all ran."""
        return self._background.wait(timeout) if self._background is not None else True

    def cancel_background(self) -> None:
        if self._background is not None:
            self._background.cancel()

    # -- store calls

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        self._log_batch([(k, float(v), now, step or 0) for k, v in metrics.items()], (), ())

    def queue_metrics(self, metrics: Iterable[tuple[str, float, int]]) -> None:
        """Buffer (key, value, step) metrics, stamped now; send the buffer once
        ``METRICS_FLUSH_SECONDS`` have passed since the last send. ``open_run`` sends what is
        left whatever the outcome, so a shorter run (a search trial) sends them all at once."""
        now = int(time.time() * 1000)
        self._metrics += [(k, float(v), now, step) for k, v, step in metrics]
        if time.monotonic() - self._sent >= METRICS_FLUSH_SECONDS:
            self.flush_metrics()

    def hold_metrics(self, metrics: Iterable[tuple[str, float, int]]) -> None:
        """Keep (key, value, step) metrics to send when the run ends, however it ends
        (``flush_metrics(final=True)``), unless a later call replaces them: the detail metrics
        of the latest epoch, which are logged only if it turns out to be the last."""
        now = int(time.time() * 1000)
        self._held = [(k, float(v), now, step) for k, v, step in metrics]

    def queue_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags with the next metrics sent (``flush_metrics``), not in a request of their
        own; ``open_run`` sends them whatever the outcome."""
        self._tags.update({k: str(v) for k, v in tags.items()})

    def flush_metrics(self, final: bool = False) -> None:
        """Send the buffered metrics and the queued tags; ``final``: the held metrics too.

        The store failing during training (not ``final``; a direct client, not a search
        worker's deferred one) does not stop it: the metrics and tags stay buffered,
        ``lost`` keeps the error (one warning), and nothing more is sent until the store
        answers again: a tracking server's health check (2 s at most, without MLflow's
        minutes of retries) every ``PROBE_SECONDS`` while training goes on (``_back``), or
        ``online`` at the end. During training a tracking server is also asked that health
        check before each send (``_answers``): one that went down is lost at once, instead
        of after MLflow's retries of the send, which training would wait for (about 4
        minutes). A final send that fails raises, with them still buffered."""
        if self.lost is not None and not final and not self._back():
            return
        buffered = self._metrics + (self._held if final else [])
        tags = list(self._tags.items())
        self._sent = time.monotonic()
        if not (buffered or tags):
            return
        if not final and not self._resumed and not self._answers():
            return
        if self._resumed and buffered:
            # the request that failed may have reached the store all the same (its answer
            # lost on the way back): what the store has is not sent again
            buffered = self._not_stored(buffered)
            self._resumed = False
        try:
            self._log_batch(buffered, (), tags)
        except Exception as e:
            if final or isinstance(self.client, writer.DeferredClient):
                raise
            self._lose(e)
            return
        self._metrics, self._tags = [], {}
        if final:
            self._held = []

    def _lose(self, e: Exception) -> None:
        self.lost = e
        log.warning(
            "run %s: the tracking store failed (%s); training goes on, and its metrics are "
            "kept for the end of the run",
            self.ref,
            first_line(e),
        )

    @property
    def _on_server(self) -> bool:
        """Whether this run writes to a tracking server itself (its health check can be
        asked): not a database store, nor a search worker's deferred writes."""
        uri = getattr(self.client, "tracking_uri", "")
        return not isinstance(self.client, writer.DeferredClient) and stores.is_server(uri)

    def _server_down(self) -> stores.StoreError | None:
        """The error of the tracking server's health check (2 s at most, without MLflow's
        minutes of retries), or None when it answers."""
        return stores.server_down(self.client.tracking_uri)

    def _answers(self) -> bool:
        """Before a send during training: whether a tracking server answers its health
        check; if not, the run is ``lost`` now (``_lose``) and asked again in
        ``PROBE_SECONDS``. Other stores, and a search worker's deferred writes: True."""
        if not self._on_server:
            return True
        down = self._server_down()
        if down is not None:
            self._probed = time.monotonic()
            self._lose(down)
            return False
        return True

    def _back(self) -> bool:
        """Whether a lost tracking server answers its health check again (asked at most
        every ``PROBE_SECONDS``); other stores are asked only at the end (``online``)."""
        now = time.monotonic()
        if self._given_up or not self._on_server or now - self._probed < PROBE_SECONDS:
            return False
        self._probed = now
        if self._server_down() is not None:
            return False
        log.info("run %s: the tracking server answers again; sending what was kept", self.ref)
        self.lost, self._resumed = None, True
        return True

    def online(self) -> bool:
        """Whether the store takes this run's records: True unless it failed during training
        (``lost``); then it is asked once more (one request, MLflow's retries included) and,
        if it answers, sending resumes; if not, False from then on. A tracking server is
        first asked its health check: one that does not answer it is not waited for through
        MLflow's retries (about 4 minutes by default); it has been lost since training, and
        what it missed is kept for ``sweeps.resend``. A run handed to a writer process is
        first waited for: one the store did not create is not online either (its requests
        go to ``uncreated``)."""
        if self._creation_refused_now():
            return False
        if self.lost is None:
            return True
        if self._given_up:
            return False
        if self._on_server and self._server_down() is not None:
            self._given_up = True  # ``lost`` keeps the failure during training
            return False
        try:
            with signals_held():
                self.client.get_run(self.ref)
        except Exception as e:
            self.lost, self._given_up = e, True
            return False
        log.info("run %s: the tracking store answers again; sending what was kept", self.ref)
        self.lost, self._resumed = None, True
        return True

    def creation_refused(self) -> bool:
        """Whether this run, handed to a writer process, is one the store refused to create
        (its requests are then in ``uncreated``); waits for the writer's answer."""
        self._creation_refused_now()
        return self.uncreated is not None

    def _creation_refused_now(self) -> bool:
        """For a run handed to a writer process whose creation is not known yet: wait for
        the writer's answer; True if the store refused to create it (``lost`` then holds
        why, ``uncreated`` its requests). False for any other run."""
        deferred = isinstance(self.client, writer.DeferredClient)
        if not deferred or self._run_id is not None or self.lost is not None:
            return False  # known already (a run never created has ``lost`` set)
        try:
            self.run_id  # noqa: B018
        except RuntimeError as e:  # its writer's store refused to create it
            self.lost, self._given_up = e, True
            self.uncreated = self.client.refused(self.ref)
            log.warning("run %s: %s", self.ref, first_line(e))
            return True
        return False

    def keep_uncreated(self, status: str, reason: str) -> Path:
        """Keep every record of a run the store never created, which ended ``status`` for
        ``reason`` (a pruned or failed search trial), in ``writer.UNSENT_ROOT`` for
        ``sweeps.resend`` (a study's launcher sends it once the store answers): the folder."""
        folder = self.kept_folder()
        folder.mkdir(parents=True, exist_ok=True)
        kept = self.kept_record()
        kept["tags"][FAILURE_TAG] = reason[:5000]
        writer.write_kept(folder, {**kept, "status": status})
        return folder.resolve()

    def kept_folder(self) -> Path:
        """Where this run's records go when its store missed them, outside a Hydra run:
        ``writer.UNSENT_ROOT`` / its id, or its stand-in and the time for a run never
        created (a stand-in names its worker's pid, which comes back)."""
        name = self.ref if self.uncreated is None else f"{self.ref}-{time.time_ns()}"
        return Path(writer.UNSENT_ROOT) / name

    def kept_record(self) -> dict[str, Any]:
        """What ``sweeps.resend`` takes (``unsent.json``): the run's id (None for a run never
        created: resend creates it), the store's URI (absolute: resend may run from
        elsewhere) and what the store did not get (``unsent``)."""
        run_id = self.ref if self.uncreated is None else None
        uri = portable_uri(self.client.tracking_uri)
        return {"run_id": run_id, "tracking_uri": uri, **self.unsent()}

    def send_last(self) -> bool:
        """Send the run's last records now: every buffered and held metric and the queued
        tags, in one request (``open_run`` then has none left to send). False when the store
        fails (after MLflow's own retries): ``lost`` then holds the error, the records stay
        buffered for ``unsent``, and the store is not asked again; training's results must
        then be kept elsewhere (``sweeps.run``'s ``unsent/`` folder)."""
        try:
            self.flush_metrics(final=True)
        except Exception as e:
            if isinstance(self.client, writer.DeferredClient):  # its writer answers for it
                raise
            self.lost, self._given_up = e, True
            log.warning(
                "run %s: the tracking store failed at the run's end (%s)", self.ref, first_line(e)
            )
            return False
        return True

    def unsent(self) -> dict[str, Any]:
        """What is buffered and not sent (metrics as key, value, timestamp in ms, step;
        the queued tags), for keeping it elsewhere when the store is gone."""
        rows = self._metrics + self._held
        tags = dict(self._tags)
        kept: dict[str, Any] = {}
        if self.uncreated is not None:  # everything handed over for it, first
            kept = requests_kept(self.uncreated)
            rows = kept.pop("metrics") + rows
            tags = {**kept.pop("tags"), **tags}
        return {"metrics": metric_dicts(rows), "tags": tags, **kept}

    def send_kept(self, kept: Mapping[str, Any]) -> None:
        """Send what ``unsent`` returned (its metrics with their own steps and timestamps,
        its tags), once the store answers again (``sweeps.resend``)."""
        rows = [(m["key"], m["value"], m["timestamp"], m["step"]) for m in kept["metrics"]]
        # an earlier send of these that failed part way left its first batches in the store
        self._log_batch(self._not_stored(rows), (), list(kept["tags"].items()))

    def _not_stored(
        self, rows: Sequence[tuple[str, float, int, int]]
    ) -> list[tuple[str, float, int, int]]:
        """``rows`` (key, value, timestamp, step) less those the store has already: a row
        is known by its key, step and timestamp (each row is stamped when it is queued). One
        metric-history request per key: asked only after the store failed."""
        stored: set[tuple[str, int, int]] = set()
        for key in dict.fromkeys(r[0] for r in rows):
            with signals_held():
                history = self.client.get_metric_history(self.run_id, key)
            stored.update((key, m.step, m.timestamp) for m in history)
        return [r for r in rows if (r[0], r[3], r[2]) not in stored]

    def _log_batch(
        self,
        metrics: Iterable[tuple[str, float, int, int]],
        params: Iterable[tuple[str, str]],
        tags: Iterable[tuple[str, str]],
    ) -> None:
        """Log metric rows (key, value, timestamp in ms, step), params and tags (key, value)
        in as few log_batch calls as MLflow's limits allow (per call: 1000 metrics, 100
        params, 100 tags, 1000 entities in all). A writer process's client takes the rows
        as they are (``writer.DeferredClient``); MLflow's own, its entities."""
        if isinstance(self.client, writer.DeferredClient):
            metrics, params, tags = list(metrics), list(params), list(tags)
        else:
            metrics, params, tags = writer.batch_entities(metrics, params, tags)
        while metrics or params or tags:
            p, params = params[:100], params[100:]
            t, tags = tags[:100], tags[100:]
            room = 1000 - len(p) - len(t)
            m, metrics = metrics[:room], metrics[room:]
            with signals_held():
                self.client.log_batch(self.ref, metrics=m, params=p, tags=t, synchronous=True)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._log_batch((), [(k, str(v)[:6000]) for k, v in params.items()], ())

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._log_batch((), (), [(k, str(v)) for k, v in tags.items()])

    def log_text(self, text: str, path: str) -> None:
        self.log_texts({path: text})

    def log_texts(self, texts: Mapping[str, str]) -> None:
        """Upload several text artifacts ({path: text}) in one request to the store; with
        deferred writes, by the writer (a trial's config, at its start, then need not wait
        for the writer to create its run)."""
        if isinstance(self.client, writer.DeferredClient):
            self.client.log_texts(self.ref, texts, self._artifact_uri)
        else:
            writer.upload_texts(self._artifacts, texts)

    def log_bytes(self, data: bytes, path: str) -> None:
        """Upload ``data`` as the artifact ``path`` (e.g. ``activations/init.png``)."""
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / Path(path).name
            file.write_bytes(data)
            self._log_file(file, path)

    def log_figure(self, fig, path: str) -> None:
        from sweeps.plots import close, png_bytes

        self.log_bytes(png_bytes(fig), path)
        close(fig)

    def log_npz(self, arrays: Mapping[str, np.ndarray], path: str) -> None:
        """Save arrays as .npz (no pickle) and upload it as ``path``. Uncompressed: float
        weights hardly compress (8% for the book's MLP) and zlib takes longer than the
        write (about 20 ms against 3-14 ms for its 110k parameters)."""
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / Path(path).name
            # allow_pickle spelled out (otherwise mypy checks **arrays against that bool
            # keyword), and False: the weights are numeric, so nothing is ever pickled, and an
            # object array would be refused rather than written as a pickle.
            np.savez(file, allow_pickle=False, **arrays)
            self._log_file(file, path)

    def _log_file(self, file: Path, path: str) -> None:
        parent = str(Path(path).parent)
        self._artifacts.log_artifact(str(file), None if parent == "." else parent)

    def log_datasets(
        self, datasets: Iterable[tuple[np.ndarray, np.ndarray, str, str, str]]
    ) -> None:
        """Record (x, t, name, digest, context) datasets as the run's inputs, in one request."""
        specs = [DatasetSpec.of(*d) for d in datasets]
        with signals_held():
            if isinstance(self.client, writer.DeferredClient):  # its writer builds them
                self.client.log_inputs(self.ref, specs)
            else:
                writer.log_inputs(self.client, self.ref, dataset_inputs(specs))

    def end(self, status: str) -> None:
        """End the run ``status``. Its id is known from here on (a deferred create is
        waited for: its writer forgets the run once it is ended); RuntimeError if the
        writer could not create it."""
        self.run_id  # noqa: B018
        with signals_held():
            self.client.set_terminated(self.ref, status=status)


class NullRun:
    """Tracking switched off: same interface, records nothing."""

    run_id = None
    lost = None

    def online(self) -> bool:
        return True

    def send_last(self) -> bool:
        return True

    def log_figure(self, fig, path: str) -> None:  # noqa: ARG002
        from sweeps.plots import close

        close(fig)  # pyplot keeps every figure open until closed

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class RunEnd(NamedTuple):
    """How an exception ends a run, in place of ``open_run``'s FAILED or KILLED with the
    reason in ``sweeps.failure``: ``status``, ``tags`` set with the end, the tag that takes
    the reason, and the reason if not ``open_run``'s (a search trial's: ``trial_state``; a
    pruned trial's own message, in ``sweeps.pruned``)."""

    status: str
    tags: Mapping[str, str]
    reason_tag: str = FAILURE_TAG
    reason: str | None = None


ENDED_RUN = "sweeps_ended_run"  # the exception attribute that names the run it ended


def ended_run(e: BaseException) -> str | None:
    """The id of the run ``open_run`` ended as its ``ends`` said for ``e``, if it did."""
    return getattr(e, ENDED_RUN, None)


@contextlib.contextmanager
def open_run(
    tracking_uri: str,
    experiment_name: str,
    artifact_root: str,
    *,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    ends: Callable[[BaseException], RunEnd | None] | None = None,
) -> Iterator[Run]:
    """Start a run and end it truthfully.

    FINISHED on success, once every artifact submitted to the run's background thread is
    logged; FAILED on an exception (a failed background job included), with the reason in
    the ``sweeps.failure`` tag ("diverged at epoch k: ..." for a non-finite loss), after
    waiting up to ``BACKGROUND_GRACE`` seconds for the artifacts already submitted (the
    histograms at initialization of a diverged run); KILLED on KeyboardInterrupt or SIGTERM
    (see ``sigterm_as_interrupt``) at once, dropping the artifacts not started. The
    exception is re-raised. A run handed to a writer process that the store refused to
    create, ended by an exception (a pruned or diverged search trial), is kept whole in
    ``writer.UNSENT_ROOT`` instead (``Run.keep_uncreated``). A run whose store stopped
    answering during training and did not answer again, or failed the run's last send
    (``Run.lost``), is left RUNNING, without more calls to the store (each would wait
    through MLflow's retries, minutes): the next ``sweeps.run`` on this machine into this
    experiment ends it KILLED (``end_dead_runs``).

    ``ends`` may say how an exception ends the run instead (``RunEnd``): a search trial's
    run then ends with its trial's state, in the requests that end it, and the exception
    names the run (``ended_run``): its worker need not read the run back to settle it.

    With deferred writes on (a search worker's), the run's writes go through its writer
    process, which creates the run too, in the experiment named (its launcher checked it
    before any work: ``check_recording``); this process then never opens the store.
    """
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run: Run | None = None
    str_tags = {k: str(v) for k, v in all_tags.items()}
    writes = writer.deferred(tracking_uri)
    if writes is None:
        client = get_client(tracking_uri)
        exp_id = ensure_experiment(client, experiment_name, artifact_root, tracking_uri)
    try:
        with signals_held():  # so that a run that exists is always ended below
            if writes is not None:
                where = writer.ExperimentName(experiment_name, artifact_root)
                run = Run(writes, writes.create_run(where, tags=str_tags, run_name=run_name))
            else:
                mlrun = client.create_run(exp_id, run_name=run_name, tags=str_tags)
                run = Run(client, mlrun.info.run_id, mlrun.info.artifact_uri)
        yield run
        run.flush_metrics(final=True)
        run.wait_background()
        run.check_background()
    except BaseException as e:
        if run is not None and isinstance(e, Exception) and _uncreated_now(run):
            # a trial pruned or failed while its store was down: no run to end, so keep it
            run.cancel_background()
            reason = str(e) if isinstance(e, DivergedError) else f"{type(e).__name__}: {e}"
            _keep_quietly(run, reason)
        elif run is not None and run.uncreated is not None:  # no run to end: records kept
            run.cancel_background()
        elif run is not None and run.lost is not None:  # each store call would wait minutes
            run.cancel_background()
            e.add_note(LEFT_RUNNING)
            log.warning(
                "run %s is left RUNNING: the tracking store does not answer (%s); the next "
                "sweeps.run on this machine into this experiment ends it KILLED",
                run.ref,
                first_line(run.lost),
            )
        elif run is not None and isinstance(e, KeyboardInterrupt):
            run.cancel_background()
            reason = f"interrupted: {type(e).__name__} {e}".strip()
            _end_as(run, e, RunEnd("KILLED", {}), reason, ends)
        elif run is not None:
            with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: stop waiting, end the run
                if not run.wait_background(BACKGROUND_GRACE):
                    log.warning("run %s: artifacts still pending were dropped", run.ref)
            run.cancel_background()
            reason = str(e) if isinstance(e, DivergedError) else f"{type(e).__name__}: {e}"
            _end_as(run, e, RunEnd("FAILED", {}), reason, ends)
        raise
    else:
        assert run is not None
        run.end("FINISHED")


LEFT_RUNNING = "left RUNNING: its tracking store does not answer"  # open_run's note


def left_running(e: BaseException) -> bool:
    """Whether ``open_run`` left its run RUNNING as ``e`` went through (its store was lost)."""
    return LEFT_RUNNING in getattr(e, "__notes__", ())


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _uncreated_now(run: Run) -> bool:
    """Whether an exception ended ``run`` before its end learnt that the store never
    created it (``Run.creation_refused``); never raises over that exception."""
    try:
        return run.uncreated is None and run.creation_refused()
    except Exception:
        log.exception("run %s: could not learn whether the store created it", run.ref)
        return False


def _keep_quietly(run: Run, reason: str) -> None:
    """``Run.keep_uncreated`` for a run ended FAILED by an exception; never raises over it."""
    try:
        kept = run.keep_uncreated("FAILED", reason)
    except Exception:
        log.exception("run %s: could not keep the records of a run never created", run.ref)
        return
    log.warning(
        "run %s: the store did not create it; its records are kept in %s "
        "(python -m sweeps.resend %s)",
        run.ref,
        kept,
        kept,
    )


def _end_as(
    run: Run,
    e: BaseException,
    default: RunEnd,
    reason: str,
    ends: Callable[[BaseException], RunEnd | None] | None,
) -> None:
    """End ``run``, which ``e`` stopped, as ``ends`` says (naming the run on ``e`` once it
    is ended: ``ended_run``), else as ``default``; never masks ``e``."""
    end = None
    if ends is not None:
        try:
            end = ends(e)
        except Exception:
            log.exception("run %s: could not tell how to end it", run.ref)
    if _end_quietly(run, end or default, reason) and end is not None:
        with contextlib.suppress(Exception):
            setattr(e, ENDED_RUN, run.run_id)  # known once ended


def _end_quietly(run: Run, end: RunEnd, reason: str) -> bool:
    """Send the buffered metrics, record the reason and ``end``'s tags, and end the run
    ``end.status``; never mask the original exception. True once the run is ended."""
    # A second Ctrl-C while we record must not leave the run RUNNING.
    with contextlib.suppress(Exception, KeyboardInterrupt):
        run.flush_metrics(final=True)
    with contextlib.suppress(Exception, KeyboardInterrupt):
        run.set_tags({**end.tags, end.reason_tag: (end.reason or reason)[:5000]})
    for _ in range(3):
        try:
            run.end(end.status)
            return True
        except KeyboardInterrupt:
            continue
        except Exception:  # the store is unreachable: nothing more we can do
            log.exception("could not mark MLflow run %s as %s", run.ref, end.status)
            return False
    return False


DETAIL = ("act/", "time/", "iteration")  # metric-name prefixes of the detail metrics


def is_detail(key: str) -> bool:
    """Whether an epoch metric is detail (``MlflowCallback``): logged every
    ``detail_metrics_every`` epochs rather than every epoch."""
    return key.startswith(DETAIL)


class MlflowCallback(Callback):
    """Sends training metrics to an open run.

    Per iteration: ``train/batch_loss`` every ``batch_loss_every`` steps. Per epoch, with the
    epoch as step: the curves ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``; the
    detail (``DETAIL``: the per-layer activation statistics ``act/<layer>/<stat>``,
    ``time/epoch``, ``time/step`` and ``iteration``) every ``detail_metrics_every`` epochs (0:
    none but the last) and at the last one. Each value is a row in the store, and a row costs
    about 0.1 ms there: a search trial of 50 epochs and 6 layers logged 1,050 detail rows,
    more than its training took, where its history.csv holds them all anyway. All are
    buffered in the run (``Run.queue_metrics``) and sent in one request at most every
    ``METRICS_FLUSH_SECONDS`` and at the end of training (with the figures or weights being
    drawn meanwhile) or of the run. At the start and the end: per-layer
    activation histograms on ``probe`` inputs; at the end: the learning-curve figure and the
    parameters as .npz.

    The figures and the weights are drawn, written and uploaded on the run's background
    thread (``Run.submit``) from copies taken here (activations, history, state dict), so the
    model may go on training; ``open_run`` waits for them. A background failure stops
    training at the next epoch end (``ArtifactError``) and the run ends FAILED.
    """

    def __init__(
        self,
        run: Run | NullRun,
        probe: np.ndarray,
        batch_loss_every: int = 10,
        log_figures: bool = True,
        log_model: bool = True,
        title: str = "",
        detail_metrics_every: int = 1,
    ) -> None:
        self.run = run
        self.probe = probe
        self.every = batch_loss_every
        self.detail_every = detail_metrics_every
        self.log_figures = log_figures
        self.log_model = log_model
        self.title = title
        self._pending: list = []

    def on_train_start(self, model) -> None:
        if self.log_figures:
            job = self._histograms(model, "activations/init.png", "at initialization")
            # Drawn before training starts, not alongside it: the drawing thread took a core
            # from the two BLAS threads, which then wait for each other; a 10-epoch run of the
            # book's MLP was +28% (median of 4, widely spread) with the overlap and +8% with
            # this wait, measured here against the same runs untracked.
            if job is not None:
                futures.wait([job])
            self.run.check_background()

    def on_batch_end(self, iteration: int, loss: float) -> None:
        if iteration % self.every == 0:
            self._pending.append((iteration, loss))

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], model) -> None:
        batch = [("train/batch_loss", v, it) for it, v in self._pending]
        detail = [(k, v, epoch) for k, v in metrics.items() if is_detail(k)]
        batch += [(k, v, epoch) for k, v in metrics.items() if k != "epoch" and not is_detail(k)]
        if self.detail_every and epoch % self.detail_every == 0:
            batch += detail
            detail = []
        # an epoch whose detail is not due: sent if it is the last one, however training ends
        # (the end of training, a failure, a pruned trial, Ctrl-C); else replaced by the next
        self.run.hold_metrics(detail)
        self._pending.clear()
        self.run.queue_metrics(batch)
        self.run.check_background()  # a figure that failed to log stops the run now

    def on_train_end(self, history: History, model) -> None:
        if not self.run.online():  # nothing would take them: sweeps.run keeps them on disk
            return
        if self.log_figures:
            self._histograms(model, "activations/final.png", "after training")
            epochs = [dict(e) for e in history.epochs]
            self.run.submit(
                "learning_curve.png",
                self._draw_learning_curves,
                epochs,
                list(history.batch_losses),
                "learning_curve.png",
            )
        if self.log_model:
            path = "model/params.npz"
            self.run.submit(path, self.run.log_npz, model.state_dict(), path)
        if self.log_figures or self.log_model:
            # after submitting: the store write overlaps the drawing; the last epoch's detail
            # too. Nothing drawn: all goes when the run ends, with what its caller queued after
            # training (a search trial's trial_state), in one request (send_last). A store
            # that fails now is not asked again: sweeps.run keeps the results on disk.
            self.run.send_last()

    def _histograms(self, model, path: str, when: str) -> futures.Future | None:
        acts = model.hidden_activations(self.probe)  # copies: training may go on meanwhile
        if not acts:
            return None
        title = f"{self.title} — {when}" if self.title else when
        names = model.activation_names()
        return self.run.submit(path, self._draw_histograms, acts, names, title, path)

    # -- on the background thread

    def _draw_histograms(self, acts: list[np.ndarray], names: list[str], title: str, path: str):
        from sweeps.plots import activation_histograms, png_bytes

        self.run.log_bytes(png_bytes(activation_histograms(acts, names, title)), path)

    def _draw_learning_curves(self, epochs: list[dict], batch_losses: list[float], path: str):
        from sweeps.plots import learning_curves, png_bytes

        self.run.log_bytes(png_bytes(learning_curves(epochs, batch_losses, self.title)), path)


def config_yaml(resolved: Mapping[str, Any]) -> str:
    """A resolved config (plain containers) as the YAML of its ``config.yaml`` artifact: the
    text ``OmegaConf.to_yaml`` writes, through libyaml's emitter when PyYAML has it (0.8 ms
    for a search trial of the book's protocol against 12 ms, paid by every tracked trial).
    As OmegaConf does, a string its loader would read back as a number (``'1e-3'``) is
    quoted."""
    import yaml

    return yaml.dump(
        dict(resolved),
        Dumper=_config_dumper(),
        default_flow_style=False,
        allow_unicode=True,
        sort_keys=False,
    )


@functools.cache
def _config_dumper() -> Any:
    import yaml

    def represent_str(dumper, data: str):
        try:
            float(data)  # OmegaConf reads 1e-3, 1_000 and inf as floats; YAML 1.1 does not
            style: str | None = "'"
        except ValueError:
            style = None  # PyYAML quotes what YAML itself would read as another type
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    dumper: Any = type("ConfigDumper", (getattr(yaml, "CSafeDumper", yaml.SafeDumper),), {})
    dumper.add_representer(str, represent_str)  # on the subclass only
    return dumper


def history_csv(history: History) -> str:
    """Per-epoch metrics as CSV text."""
    keys = sorted({k for e in history.epochs for k in e})
    buf = io.StringIO()
    buf.write(",".join(keys) + "\n")
    for e in history.epochs:
        buf.write(",".join(repr(e.get(k, "")) for k in keys) + "\n")
    return buf.getvalue()


def environment_tags() -> dict[str, str]:
    """What, besides the config, decides a run's numbers: code, versions and platform
    (``sweeps.reproduce`` compares them to explain a difference)."""
    tags = {
        "sweeps_version": sweeps.__version__,
        "python_version": platform.python_version(),
        "numpy_version": np.__version__,
        "platform": platform.platform(),
        "host_pid": str(os.getpid()),
        HOST_TAG: procs.hostname(),
        **git_state(),
    }
    if process := procs.process_id():  # which process, to tell later whether it died
        tags[PROCESS_TAG] = process  # (not where /proc does not say)
    if machine := procs.machine_id():
        tags[MACHINE_TAG] = machine
    return tags


def end_dead_runs(tracking_uri: str, experiment_name: str, artifact_root: str) -> list[str]:
    """End KILLED, with the reason in ``sweeps.failure``, the runs of this experiment left
    RUNNING by a ``sweeps.run`` process of this machine that is gone: killed with SIGKILL or
    by the kernel's OOM killer, or crashed in the interpreter, none of which lets a process
    end its run, or cut off by a reboot. Processes of this machine's current boot and pid
    namespace are judged by their pid, and a run of an earlier boot of this machine (tags
    ``host_name`` and ``host_machine``) is gone (``procs.gone``, ``certain``); a run of
    another machine, or of another container sharing the store (even under this host name,
    or this container before a restart: a run left RUNNING is only a label, a live run
    ended KILLED would be wrong), is left as it is. Search runs (tag ``sweeps.role``) are
    left to the search, which knows their trials' states. Returns the ids of the runs it
    ended."""
    space = procs.pid_space()
    if not space:
        return []
    client = get_client(tracking_uri)
    exp_id = ensure_experiment(client, experiment_name, artifact_root, tracking_uri)
    running = "attributes.status = 'RUNNING'"
    runs = {
        run.info.run_id: run
        for where in (
            f"tags.{PROCESS_TAG} LIKE '{space}/%'",
            f"tags.{HOST_TAG} = '{procs.hostname()}'",
        )
        for run in client.search_runs([exp_id], f"{running} AND {where}", max_results=1000)
    }
    ended = []
    for run in runs.values():
        tags = run.data.tags
        pid = tags.get("host_pid", "?")
        if "sweeps.role" in tags or not procs.gone(
            tags.get(PROCESS_TAG, ""),
            tags.get(HOST_TAG, ""),
            int(pid) if pid.isdigit() else 0,
            machine=tags.get(MACHINE_TAG, ""),
            certain=True,
        ):
            continue
        client.set_tag(run.info.run_id, FAILURE_TAG, f"its process ({pid}) died without ending it")
        client.set_terminated(run.info.run_id, status="KILLED")
        ended.append(run.info.run_id)
    return ended
