"""MLflow recording: the run lifecycle and the training callback.

``open_run`` creates (or resumes) an MLflow run with the resolved config as params and the
group choices, seed, sweep id, git state and version as tags, and guarantees a truthful end
status: FINISHED, FAILED with the reason, or KILLED on Ctrl-C/SIGTERM. Nothing is left
RUNNING. ``MlflowCallback`` buffers per-iteration losses and sends one batch per epoch, so
tracking stays off the training hot path. ``NullRun`` has the same interface and does nothing,
so callers never branch on whether tracking is on.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

import sweeps
from sweeps.locks import flock
from sweeps.train import Callback, DivergedError, History

log = logging.getLogger(__name__)

FAILURE_TAG = "sweeps.failure"


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM so the run can end as KILLED."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into a ``Terminated`` exception while the block runs."""

    def handler(signum, frame):  # noqa: ARG001
        raise Terminated(f"received signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Deliver SIGINT and SIGTERM only once the block is done.

    A KeyboardInterrupt raised inside MLflow's SQLAlchemy store can leave a SQLite statement
    open, and the database locked for every later write: the run could not be marked KILLED
    and stayed RUNNING. So store calls are not interrupted; a second signal during one is
    delivered at once (the store may hang).
    """
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
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
    """Commit and dirty flag of the source checkout the package runs from, if any."""
    where = path or Path(sweeps.__file__).resolve().parent
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


def local_store_paths(tracking_uri: str) -> None:
    """Make sure the folder of a local SQLite store exists."""
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def get_client(tracking_uri: str):
    """A client whose store is ready. A local SQLite store is created (tables and migrations)
    under a lock beside the database file: two processes opening a new store at once would
    otherwise race to create the same tables, and one of them fail."""
    from mlflow import MlflowClient

    local_store_paths(tracking_uri)
    if not tracking_uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=tracking_uri)
    with flock(Path(tracking_uri.removeprefix("sqlite:///") + ".init.lock")):
        return MlflowClient(tracking_uri=tracking_uri)  # builds (and caches) the store


def ensure_experiment(client, name: str, artifact_root: str, tracking_uri: str) -> str:
    """Experiment id for ``name``, created with artifacts under ``artifact_root`` for a local
    store (a tracking server decides its own artifact location). Safe against a concurrent
    creator."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not tracking_uri.startswith(("http://", "https://")):
        location = Path(artifact_root).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        exp = client.get_experiment_by_name(name)  # another process created it first
        if exp is None:
            raise
        return exp.experiment_id


class Run:
    """An open MLflow run: thin helpers over MlflowClient for one run id."""

    def __init__(self, client, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.log_metric_entities(batch)

    def log_metric_entities(self, batch: list) -> None:
        for i in range(0, len(batch), 1000):  # MLflow's limit per log_batch call
            with signals_held():
                self.client.log_batch(self.run_id, metrics=batch[i : i + 1000], synchronous=True)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's limit per log_batch call
            with signals_held():
                self.client.log_batch(self.run_id, params=items[i : i + 100], synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            with signals_held():
                self.client.log_batch(self.run_id, tags=items[i : i + 100], synchronous=True)

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def log_figure(self, fig, path: str) -> None:
        from sweeps.plots import close

        self.client.log_figure(self.run_id, fig, path)
        close(fig)

    def log_npz(self, arrays: Mapping[str, np.ndarray], path: str) -> None:
        """Save arrays as .npz (no pickle) and upload it as ``path``."""
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / Path(path).name
            np.savez(file, **arrays)
            parent = str(Path(path).parent)
            self.client.log_artifact(self.run_id, str(file), None if parent == "." else parent)

    def log_dataset(
        self, x: np.ndarray, t: np.ndarray, name: str, digest: str, context: str
    ) -> None:
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        ds = mlflow.data.from_numpy(x, targets=t, name=name, digest=digest)
        entity = ds._to_mlflow_entity()
        with signals_held():
            self.client.log_inputs(
                self.run_id, [DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])]
            )

    def end(self, status: str) -> None:
        with signals_held():
            self.client.set_terminated(self.run_id, status=status)


class NullRun:
    """Tracking switched off: same interface, records nothing."""

    run_id = None

    def log_figure(self, fig, path: str) -> None:  # noqa: ARG002
        from sweeps.plots import close

        close(fig)  # pyplot keeps every figure open until closed

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def open_run(
    tracking_uri: str,
    experiment_name: str,
    artifact_root: str,
    *,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> Iterator[Run]:
    """Start a run and end it truthfully.

    FINISHED on success; FAILED on an exception, with the reason in the ``sweeps.failure``
    tag ("diverged at epoch k: ..." for a non-finite loss); KILLED on KeyboardInterrupt or
    SIGTERM (see ``sigterm_as_interrupt``). The exception is re-raised.
    """
    client = get_client(tracking_uri)
    exp_id = ensure_experiment(client, experiment_name, artifact_root, tracking_uri)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run: Run | None = None
    try:
        with signals_held():  # so that a run that exists is always ended below
            mlrun = client.create_run(
                exp_id, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()}
            )
            run = Run(client, mlrun.info.run_id)
        yield run
    except KeyboardInterrupt as e:
        if run is not None:
            _end_quietly(run, "KILLED", f"interrupted: {type(e).__name__} {e}".strip())
        raise
    except BaseException as e:
        if run is not None:
            reason = str(e) if isinstance(e, DivergedError) else f"{type(e).__name__}: {e}"
            _end_quietly(run, "FAILED", reason)
        raise
    else:
        assert run is not None
        run.end("FINISHED")


def _end_quietly(run: Run, status: str, reason: str) -> None:
    """Record the reason and the end status; never mask the original exception."""
    # A second Ctrl-C while we record must not leave the run RUNNING.
    with contextlib.suppress(Exception, KeyboardInterrupt):
        run.set_tags({FAILURE_TAG: reason[:5000]})
    for _ in range(3):
        try:
            run.end(status)
            return
        except KeyboardInterrupt:
            continue
        except Exception:  # the store is unreachable: nothing more we can do
            log.exception("could not mark MLflow run %s as %s", run.run_id, status)
            return


class MlflowCallback(Callback):
    """Sends training metrics to an open run.

    Per iteration: ``train/batch_loss`` every ``batch_loss_every`` steps, buffered in memory.
    Per epoch (one log_batch request): ``train/loss``, ``train/acc``, ``val/loss``,
    ``val/acc``, the per-layer activation statistics ``act/<layer>/<stat>``, ``time/epoch``, ``time/step``,
    and the buffered batch losses. At the start and the end: per-layer activation histograms
    on ``probe`` inputs; at the end: the learning-curve figure and the parameters as .npz.
    """

    def __init__(
        self,
        run: Run | NullRun,
        probe: np.ndarray,
        batch_loss_every: int = 10,
        log_figures: bool = True,
        log_model: bool = True,
        title: str = "",
    ) -> None:
        self.run = run
        self.probe = probe
        self.every = batch_loss_every
        self.log_figures = log_figures
        self.log_model = log_model
        self.title = title
        self._pending: list = []

    def on_train_start(self, model) -> None:
        if self.log_figures:
            self._histograms(model, "activations/init.png", "at initialization")

    def on_batch_end(self, iteration: int, loss: float) -> None:
        if iteration % self.every == 0:
            self._pending.append((iteration, loss))

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], model) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric("train/batch_loss", float(v), now, it) for it, v in self._pending]
        batch += [
            Metric(k, float(v), now, epoch) for k, v in metrics.items() if k not in ("epoch",)
        ]
        self._pending.clear()
        self.run.log_metric_entities(batch)

    def on_train_end(self, history: History, model) -> None:
        if self.log_figures:
            from sweeps.plots import learning_curves

            self._histograms(model, "activations/final.png", "after training")
            self.run.log_figure(
                learning_curves(history.epochs, history.batch_losses, self.title),
                "learning_curve.png",
            )
        if self.log_model:
            self.run.log_npz(model.state_dict(), "model/params.npz")

    def _histograms(self, model, path: str, when: str) -> None:
        from sweeps.plots import activation_histograms

        acts = model.hidden_activations(self.probe)
        if acts:
            title = f"{self.title} — {when}" if self.title else when
            self.run.log_figure(activation_histograms(acts, model.activation_names(), title), path)


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
    return {
        "sweeps_version": sweeps.__version__,
        "python_version": platform.python_version(),
        "numpy_version": np.__version__,
        "platform": platform.platform(),
        "host_pid": str(os.getpid()),
        **git_state(),
    }
