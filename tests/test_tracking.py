"""The local MLflow store under concurrent use; the tracking callback's background thread
and buffered metrics."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from sweeps import plots, resend, tracking
from sweeps.config import validate
from sweeps.experiment import load_splits, train
from sweeps.train import Callback

OPEN_RUN = """
import sys, time
from sweeps import tracking
start = float(sys.argv[2])
while time.time() < start:  # line the processes up so they open the new store together
    time.sleep(0.001)
with tracking.open_run(sys.argv[1], "race", sys.argv[3]) as run:
    run.log_metrics({"x": 1.0})
"""


def test_processes_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path):
    """Two `sweeps.run` launched together on a fresh store raced to create its tables
    ("table ... already exists") and one of them failed before training."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    start = time.time() + 3.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_RUN, uri, str(start), str(tmp_path / "artifacts")],
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(errors)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("race")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}


LOG_DATASETS = """
import sys, time
import numpy as np
from sweeps import tracking
uri, artifacts, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
x, t = np.zeros((4, 3), np.float32), np.arange(4)
for i in range(8):  # dataset i in a new run of each process, both at start + i/4 s
    with tracking.open_run(uri, "datasets", artifacts) as run:
        while time.time() < start + i * 0.25:
            time.sleep(0.0005)
        run.log_datasets([(x, t, f"d{i}", f"digest{i}", "training")])
"""


def test_processes_logging_the_same_new_dataset_at_once_all_succeed(tmp_path):
    """Two workers' first trials log the same new dataset together: the store looks it up,
    finds it in neither, and the second insert broke the uniqueness constraint, failing the
    trial (without the retry, about half of these 16 calls failed here)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.ensure_experiment(tracking.get_client(uri), "datasets", str(tmp_path / "a"), uri)
    start = time.time() + 5.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOG_DATASETS, uri, str(tmp_path / "a"), str(start)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(errors)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("datasets").experiment_id])
    assert len(runs) == 16 and {r.info.status for r in runs} == {"FINISHED"}
    names = sorted(d.dataset.name for r in runs for d in r.inputs.dataset_inputs)
    assert names == sorted(f"d{i}" for i in range(8) for _ in range(2))


HOLD_LOCK = """
import fcntl, sys, time
with open(sys.argv[1], "a+b") as fh:
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_store_this_process_opened_is_not_held_up_by_another_process_opening_it(tmp_path):
    """The store's init lock guards creating its tables; once this process has opened the
    store, another process holding that lock (a search worker's writer process opening the
    store) does not stop this one from getting its client."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.get_client(uri)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, f"{tmp_path / 'mlflow.db'}.init.lock"],
        stdout=subprocess.PIPE,
        text=True,
    )
    got: list[object] = []
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        opener = threading.Thread(target=lambda: got.append(tracking.get_client(uri)))
        opener.start()
        opener.join(timeout=120)  # it waits on the lock, held until the holder is killed
        assert got, "get_client waited on the init lock of a store this process had opened"
    finally:
        holder.kill()
        holder.wait()
    got[0].search_experiments()  # type: ignore[attr-defined]


def test_a_local_store_is_put_in_wal_mode_and_copies_keep_its_runs(tmp_path):
    import sqlite3

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    with tracking.open_run(uri, "wal", str(tmp_path / "artifacts")) as run:
        run.log_metrics({"x": 2.0})
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # The writes may still sit in mlflow.db-wal (the client above keeps its connection):
    # copy_store takes them along.
    tracking.copy_store(db, tmp_path / "copy.db")
    client = MlflowClient(f"sqlite:///{tmp_path / 'copy.db'}")
    (got,) = client.search_runs([client.get_experiment_by_name("wal").experiment_id])
    assert got.info.status == "FINISHED" and got.data.metrics == {"x": 2.0}


@pytest.mark.parametrize(
    ("uri", "path"),
    [
        ("sqlite:///mlruns/mlflow.db", Path("mlruns/mlflow.db")),
        ("sqlite:////tmp/x/mlflow.db", Path("/tmp/x/mlflow.db")),
        ("sqlite:///mlruns/mlflow.db?timeout=60&mode=rwc", Path("mlruns/mlflow.db")),
        ("sqlite:///:memory:", None),
        ("sqlite:///:memory:?cache=shared", None),
        ("sqlite:///", None),
        ("sqlite://", None),
        ("postgresql://user:secret@host/db", None),
        ("http://localhost:5000", None),
        ("mlruns/optuna/journal.log", None),
    ],
)
def test_sqlite_path_is_the_database_file_of_a_sqlite_uri(uri, path):
    assert tracking.sqlite_path(uri) == path


def test_get_client_prepares_only_the_file_a_sqlite_uri_names(tmp_path, monkeypatch):
    """The lock and WAL mode go to the database file without the URI's query string; a
    server or an in-memory database goes straight to the client and leaves no file."""
    import sqlite3

    import mlflow

    made: list[str] = []
    monkeypatch.setattr(mlflow, "MlflowClient", lambda tracking_uri: made.append(tracking_uri))
    monkeypatch.chdir(tmp_path)
    uris = ["http://localhost:5000", "sqlite:///:memory:"]
    for uri in uris:
        tracking.get_client(uri)
    assert list(tmp_path.iterdir()) == []
    uris.append(f"sqlite:///{tmp_path}/store/m.db?timeout=60")
    tracking.get_client(uris[-1])
    assert made == uris
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["m.db", "m.db.init.lock"]
    with contextlib.closing(sqlite3.connect(tmp_path / "store" / "m.db")) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- the callback's background thread and buffered metrics -------------------------------------

ARTIFACTS = {
    "activations/init.png",
    "activations/final.png",
    "learning_curve.png",
    "model/params.npz",
}
TINY = ["model.hidden_sizes=[16,16]"]


def _train_tracked(store, cfg, callbacks=()) -> str:
    """Train ``cfg`` inside ``open_run`` with the default logging; the run id (also when
    open_run raises: the exception propagates after the run is ended)."""
    rng = np.random.default_rng(cfg.seed)
    splits = load_splits(cfg, rng)
    ids = []
    try:
        with tracking.open_run(store["uri"], "bg", store["artifacts"]) as run:
            ids.append(run.run_id)
            cb = tracking.MlflowCallback(run, splits.val.x[:100], 1, True, True, "title")
            train(cfg, [cb, *callbacks], splits=splits, rng=rng)
    finally:
        assert ids, "open_run failed before the run was created"
    return ids[0]


def _artifacts(client, run_id, path=None) -> set[str]:
    out: set[str] = set()
    for a in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def _slow(monkeypatch, seconds: float = 0.3) -> None:
    """Slow down every figure on the background thread: training is long over by then."""
    original = plots.png_bytes

    def slow_png(fig):
        time.sleep(seconds)
        return original(fig)

    monkeypatch.setattr(plots, "png_bytes", slow_png)


def test_every_artifact_is_logged_before_the_run_is_finished(mlflow_store, run_cfg, monkeypatch):
    _slow(monkeypatch)
    run_id = _train_tracked(mlflow_store, run_cfg(TINY))
    client = MlflowClient(mlflow_store["uri"])
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED"
    assert _artifacts(client, run_id) == ARTIFACTS
    for name in ("activations/init.png", "activations/final.png", "learning_curve.png"):
        local = client.download_artifacts(run_id, name, str(Path(mlflow_store["dir"]) / "dl"))
        assert Path(local).read_bytes().startswith(b"\x89PNG"), name
    # every epoch's metrics were sent, though training took less than the flush interval
    assert [m.step for m in client.get_metric_history(run_id, "val/acc")] == [1, 2]


@pytest.mark.parametrize(
    ("broken", "artifact"),
    [("learning_curves", "learning_curve.png"), ("activation_histograms", "activations/init.png")],
)
def test_a_failure_on_the_background_thread_fails_the_run(
    mlflow_store, run_cfg, monkeypatch, broken, artifact
):
    def draw(*args, **kwargs):
        raise ValueError("no figure today")

    monkeypatch.setattr(plots, broken, draw)
    with pytest.raises(tracking.ArtifactError, match=f"could not log {artifact}") as info:
        _train_tracked(mlflow_store, run_cfg(TINY))
    assert isinstance(info.value.__cause__, ValueError)
    client = MlflowClient(mlflow_store["uri"])
    (r,) = client.search_runs([client.get_experiment_by_name("bg").experiment_id])
    assert r.info.status == "FAILED"
    reason = r.data.tags[tracking.FAILURE_TAG]
    assert f"ArtifactError: could not log {artifact}: ValueError: no figure today" == reason


def test_a_failure_at_initialization_stops_training_at_an_epoch_end(
    mlflow_store, run_cfg, monkeypatch
):
    def draw(*args, **kwargs):
        raise ValueError("broken histogram")

    monkeypatch.setattr(plots, "activation_histograms", draw)
    epochs: list[int] = []

    class Count(Callback):
        def on_epoch_end(self, epoch, metrics, model):
            epochs.append(epoch)

    with pytest.raises(tracking.ArtifactError, match="activations/init.png"):
        _train_tracked(mlflow_store, run_cfg([*TINY, "trainer.epochs=10000"]), [Count()])
    assert len(epochs) < 10000  # stopped as soon as an epoch ended after the failure


def _open(store):
    return tracking.open_run(store["uri"], "bg", store["artifacts"])


def test_a_failed_run_keeps_the_artifacts_already_submitted(mlflow_store):
    client = MlflowClient(mlflow_store["uri"])

    def late_figure(run):
        time.sleep(0.3)
        run.log_bytes(b"\x89PNG late", "activations/init.png")

    with pytest.raises(RuntimeError, match="diverged"), _open(mlflow_store) as run:
        run.submit("activations/init.png", late_figure, run)
        run.queue_metrics([("train/loss", 2.3, 1)])
        run.queue_tags({"data_digest": "abc"})
        raise RuntimeError("diverged")
    r = client.get_run(run.run_id)
    assert r.info.status == "FAILED"
    assert _artifacts(client, run.run_id) == {"activations/init.png"}
    assert r.data.metrics == {"train/loss": 2.3}  # buffered metrics are sent on failure too
    assert r.data.tags["data_digest"] == "abc"  # and queued tags


def test_queued_tags_go_with_the_metrics_and_uploads_need_no_run_lookup(mlflow_store, monkeypatch):
    calls: list[str] = []
    for name in ("log_batch", "get_run"):
        real = getattr(MlflowClient, name)
        monkeypatch.setattr(
            MlflowClient,
            name,
            lambda self, *a, _real=real, _name=name, **k: (
                calls.append(_name) or _real(self, *a, **k)
            ),
        )
    with _open(mlflow_store) as run:
        run.log_texts({"config.yaml": "a: 1\n", "sub/overrides.yaml": "- a=1\n"})
        run.log_text("x,y\n", "history.csv")
        run.log_bytes(b"\x89PNG", "activations/final.png")
        run.queue_tags({f"t{i}": i for i in range(150)})  # more than one log_batch takes
        run.queue_metrics([("train/loss", 2.3, 1), ("train/loss", 2.1, 2)])
        run.queue_metrics([("train/acc", 0.1 * i, i) for i in range(950)])
        run.log_params({f"p{i}": i for i in range(120)})  # more than one log_batch takes
    # the params: 100, then 20; at the end 100 tags + 900 metrics (1000 entities a call),
    # then 50 tags + the other 50 metrics
    assert calls == ["log_batch"] * 4
    client = MlflowClient(mlflow_store["uri"])
    r = client.get_run(run.run_id)
    assert r.info.status == "FINISHED"
    assert {f"t{i}" for i in range(150)} <= set(r.data.tags) and r.data.tags["t149"] == "149"
    assert r.data.params == {f"p{i}": str(i) for i in range(120)}
    assert [m.value for m in client.get_metric_history(run.run_id, "train/loss")] == [2.3, 2.1]
    assert len(client.get_metric_history(run.run_id, "train/acc")) == 950
    assert _artifacts(client, run.run_id) == {
        "config.yaml",
        "sub/overrides.yaml",
        "history.csv",
        "activations/final.png",
    }


def test_ctrl_c_ends_the_run_killed_without_waiting_for_the_background(mlflow_store):
    release, started = threading.Event(), threading.Event()
    ran: list[str] = []

    def blocked():
        started.set()
        release.wait(60)
        ran.append("blocked")

    try:
        with pytest.raises(KeyboardInterrupt), _open(mlflow_store) as run:
            run.submit("a.png", blocked)
            run.submit("b.png", lambda: ran.append("queued"))
            run.queue_metrics([("train/loss", 2.3, 1)])
            assert started.wait(30)
            raise KeyboardInterrupt
        # open_run returned while the running job is still blocked: it did not wait for it
        assert ran == []
        r = MlflowClient(mlflow_store["uri"]).get_run(run.run_id)
        assert r.info.status == "KILLED"
        assert r.data.tags[tracking.FAILURE_TAG].startswith("interrupted")
        assert r.data.metrics == {"train/loss": 2.3}
    finally:
        release.set()
    run._background._pool.shutdown(wait=True)
    assert ran == ["blocked"]  # the queued job was dropped, never run


def test_untracked_training_draws_nothing_and_never_imports_mlflow(run_cfg):
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from sweeps import tracking\n"
        "from sweeps.config import load\n"
        "from sweeps.experiment import load_splits, train\n"
        "cfg = load(['data=synthetic', 'trainer.epochs=2', 'model.hidden_sizes=[8]'])\n"
        "rng = np.random.default_rng(0)\n"
        "splits = load_splits(cfg, rng)\n"
        "cb = tracking.MlflowCallback(tracking.NullRun(), splits.val.x[:10])\n"
        "train(cfg, [cb], splits=splits, rng=rng)\n"
        "assert 'mlflow' not in sys.modules and 'matplotlib' not in sys.modules, sorted(\n"
        "    m for m in sys.modules if m.startswith(('mlflow', 'matplotlib')))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("stop", [None, RuntimeError, KeyboardInterrupt])
def test_the_last_epochs_detail_metrics_are_sent_however_training_ends(mlflow_store, run_cfg, stop):
    """Detail metrics every 2nd epoch: epoch 3, the last, is logged too, also when training
    stops there by an exception (a pruned trial, a failure, Ctrl-C)."""
    cfg = run_cfg([*TINY, "trainer.epochs=3"])
    rng = np.random.default_rng(cfg.seed)
    splits = load_splits(cfg, rng)

    class StopAtThree(Callback):
        def on_epoch_end(self, epoch, metrics, model):
            if stop is not None and epoch == 3:
                raise stop("stop")

    ids = []
    if stop is not None:
        cfg = run_cfg([*TINY, "trainer.epochs=4"])  # stopped at 3
    with (
        contextlib.suppress(RuntimeError, KeyboardInterrupt),
        tracking.open_run(mlflow_store["uri"], "bg", mlflow_store["artifacts"]) as run,
    ):
        ids.append(run.run_id)
        cb = tracking.MlflowCallback(run, splits.val.x[:50], 1, False, False, "", 2)
        train(cfg, [cb, StopAtThree()], splits=splits, rng=rng)
    client = MlflowClient(mlflow_store["uri"])
    status = {None: "FINISHED", RuntimeError: "FAILED", KeyboardInterrupt: "KILLED"}[stop]
    assert client.get_run(ids[0]).info.status == status
    assert [m.step for m in client.get_metric_history(ids[0], "val/acc")] == [1, 2, 3]
    for key in ("act/1/mean", "time/epoch", "iteration"):
        assert [m.step for m in client.get_metric_history(ids[0], key)] == [2, 3], key


def test_detail_metrics_every_0_logs_the_last_epochs_only(mlflow_store, run_cfg):
    cfg = run_cfg([*TINY, "trainer.epochs=3"])
    rng = np.random.default_rng(cfg.seed)
    splits = load_splits(cfg, rng)
    with tracking.open_run(mlflow_store["uri"], "bg", mlflow_store["artifacts"]) as run:
        cb = tracking.MlflowCallback(run, splits.val.x[:50], 1, False, False, "", 0)
        train(cfg, [cb], splits=splits, rng=rng)
    client = MlflowClient(mlflow_store["uri"])
    assert [m.step for m in client.get_metric_history(run.run_id, "val/acc")] == [1, 2, 3]
    for key in ("act/1/mean", "time/epoch", "iteration"):
        assert [m.step for m in client.get_metric_history(run.run_id, key)] == [3], key


def test_datasets_record_their_source_without_mlflow_context_providers(mlflow_store, monkeypatch):
    """from_numpy alone runs MLflow's context providers for every dataset (GitPython opens
    the checkout; a Ctrl-C in its Repo finalizer was swallowed). The source is built once
    per process instead, with the same tags."""
    import json

    from mlflow.tracking.context import registry

    def providers(*args, **kwargs):
        raise AssertionError("MLflow's run-context providers ran")

    monkeypatch.setattr(registry, "resolve_tags", providers)
    x, t = np.zeros((4, 3), np.float32), np.arange(4)
    with _open(mlflow_store) as run:
        run.log_datasets([(x, t, "train", "abc", "training"), (x, t, "val", "abd", "eval")])
    inputs = MlflowClient(mlflow_store["uri"]).get_run(run.run_id).inputs.dataset_inputs
    assert sorted(d.dataset.name for d in inputs) == ["train", "val"]
    tags = json.loads(inputs[0].dataset.source)["tags"]
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"] == os.path.abspath(sys.argv[0])
    commit = tracking.git_state()["git_commit"]
    assert tags.get("mlflow.source.git.commit") == (None if commit == "unknown" else commit)


def test_a_dataset_another_worker_inserted_at_the_same_moment_is_retried(mlflow_store, monkeypatch):
    """Two workers' first trials log the same new dataset at once: the store's lookup finds
    it in neither, the second insert breaks the uniqueness constraint (the error below is the
    one a tracking server returned). The call is repeated and the run gets its inputs; any
    other store error is raised at once."""
    from mlflow.exceptions import MlflowException, RestException

    real = MlflowClient.log_inputs
    calls: list[int] = []
    race = (
        "BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id,"
        " datasets.name, datasets.digest"
    )

    def racing(self, run_id, inputs):
        calls.append(1)
        if len(calls) == 1:
            raise RestException({"error_code": "BAD_REQUEST", "message": race})
        return real(self, run_id, inputs)

    monkeypatch.setattr(MlflowClient, "log_inputs", racing)
    x, t = np.zeros((4, 3), np.float32), np.arange(4)
    with _open(mlflow_store) as run:
        run.log_datasets([(x, t, "synthetic-train", "abc", "training")])
    assert len(calls) == 2
    inputs = MlflowClient(mlflow_store["uri"]).get_run(run.run_id).inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [("synthetic-train", "abc")]

    def broken(self, run_id, inputs):
        calls.append(1)
        raise MlflowException("INVALID_PARAMETER_VALUE: no such run")

    calls.clear()
    monkeypatch.setattr(MlflowClient, "log_inputs", broken)
    with pytest.raises(MlflowException, match="no such run"), _open(mlflow_store) as run:
        run.log_datasets([(x, t, "synthetic-train", "abc", "training")])
    assert len(calls) == 1


def test_config_yaml_writes_what_omegaconf_writes_and_reads_back_the_same(compose_cfg):
    import yaml
    from omegaconf import OmegaConf

    for overrides in ([], ["model=simple_cnn", "optimizer=adam", "weight_decay=l2"]):
        resolved = OmegaConf.to_container(compose_cfg(overrides), resolve=True)
        assert tracking.config_yaml(resolved) == OmegaConf.to_yaml(OmegaConf.create(resolved))
    tricky = {
        "exp": "1e-3",  # a float to OmegaConf's loader, a string to YAML 1.1
        "under": "1_000",
        "inf": "inf",
        "int": "10",
        "bool": "yes",
        "null": "null",
        "empty": "",
        "text": "plain words: here",
        "none": None,
        "list": [1, "2", 0.5, True],
        "nested": {"lr": 0.01, "name": "on"},
    }
    text = tracking.config_yaml(tricky)
    assert OmegaConf.to_container(OmegaConf.create(text)) == tricky
    assert yaml.safe_load(text) == tricky


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallow
@pytest.mark.parametrize("where", ["batch", "epoch"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_swallowed_by_a_finalizer_still_stops_training(sig, where):
    """A Ctrl-C (or SIGTERM) whose exception is raised inside a finalizer is only printed
    ("Exception ignored in ..."); the recorded signal is raised again after the batch, or
    after the epoch's evaluation when it landed there."""
    from sweeps.nn import mlp
    from sweeps.optim import make_optimizer
    from sweeps.train import TrainSettings, fit

    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((200, 4)), rng.integers(0, 3, 200)
    seen: list[int] = []

    class Swallows:
        def __del__(self):
            os.kill(os.getpid(), sig)
            for _ in range(1000):  # the signal's handler runs in here, its exception ignored
                pass

    class Trigger(Callback):
        def on_batch_end(self, iteration, loss):
            seen.append(iteration)
            if where == "batch" and iteration == 2:
                Swallows()  # collected at once

        def on_epoch_end(self, epoch, metrics, model):
            if where == "epoch" and epoch == 1:
                Swallows()

    def train(*checks):
        settings = TrainSettings(epochs=2, batch_size=20)
        model = mlp(4, [5], 3, rng=np.random.default_rng(0))
        fit(
            model,
            make_optimizer("sgd"),
            (x, t),
            None,
            settings,
            rng,
            callbacks=[Trigger(), *checks],
        )

    expected = tracking.Terminated if sig == signal.SIGTERM else KeyboardInterrupt
    with tracking.sigterm_as_interrupt():
        train()  # nothing stops it: the exception was swallowed
    assert seen[-1] == 20
    seen.clear()
    with pytest.raises(expected, match="swallowed"), tracking.sigterm_as_interrupt():
        train(tracking.InterruptCheck())
    assert seen[-1] == (2 if where == "batch" else 10)  # 10 batches an epoch
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_mlflow_telemetry_is_off_in_the_tests():
    """No network at test time: the test process imported MLflow with its telemetry off,
    whether or not CI=true is set (conftest)."""
    from mlflow.telemetry.client import get_telemetry_client

    assert get_telemetry_client() is None


def test_without_proc_a_run_records_no_process_and_no_run_is_judged(monkeypatch):
    from sweeps import procs, tracking

    assert tracking.environment_tags()[tracking.PROCESS_TAG] == procs.process_id()
    assert tracking.environment_tags()[tracking.HOST_TAG] == procs.hostname()
    if procs.machine_id():
        assert tracking.environment_tags()[tracking.MACHINE_TAG] == procs.machine_id()
    monkeypatch.setattr(procs, "pid_space", lambda: "")  # no /proc (macOS)
    assert procs.process_id() == ""
    assert tracking.PROCESS_TAG not in tracking.environment_tags()
    monkeypatch.setattr(tracking, "get_client", lambda uri: pytest.fail("the store was read"))
    assert tracking.end_dead_runs("sqlite:///unused.db", "sweeps", "unused") == []


# -- a store that stops answering during a run ------------------------------------------------


class _Outage:
    """MlflowClient's log_batch and get_run failing while ``down``, as against a tracking
    server that went away (MLflow raises once its own retries are spent); counts the calls
    made while down."""

    def __init__(self, monkeypatch, after_batches: int = 0) -> None:
        from mlflow.exceptions import MlflowException

        self.down, self.calls_while_down, self.batches = False, [], 0
        for name in ("log_batch", "get_run"):
            real = getattr(MlflowClient, name)

            def call(client, *a, _real=real, _name=name, **k):
                if _name == "log_batch":
                    self.batches += 1
                    if self.batches > after_batches > 0:
                        self.down = True
                if self.down:
                    self.calls_while_down.append(_name)
                    raise MlflowException(
                        "API request to http://127.0.0.1:5055/api/2.0/mlflow/runs/log-batch "
                        "failed with exception HTTPConnectionPool: Max retries exceeded"
                    )
                return _real(client, *a, **k)

            monkeypatch.setattr(MlflowClient, name, call)


def _run_with_outage(store, compose_cfg, monkeypatch, flush_seconds: float, after_batches: int):
    """sweeps.run's path (``execute``), 4 epochs on synthetic data, with the store failing
    after ``after_batches`` log_batch calls: (TrackingLost, the outage, the client, the run)."""
    from sweeps.run import execute

    monkeypatch.setattr(tracking, "METRICS_FLUSH_SECONDS", flush_seconds)
    overrides = [
        "data=synthetic",
        "model.hidden_sizes=[16,16]",
        "trainer.epochs=4",
        f"mlflow.tracking_uri={store['uri']}",
        f"mlflow.artifact_root={store['artifacts']}",
    ]
    dcfg = compose_cfg(overrides)
    outage = _Outage(monkeypatch, after_batches=after_batches)
    with pytest.raises(tracking.TrackingLost) as e:
        execute(validate(dcfg), OmegaConf.to_container(dcfg, resolve=True), overrides)
    client = MlflowClient(store["uri"])
    (r,) = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    return e.value, outage, client, r


def test_a_store_that_fails_during_training_gets_the_kept_metrics_once_it_answers(
    mlflow_store, monkeypatch, caplog
):
    monkeypatch.setattr(tracking, "METRICS_FLUSH_SECONDS", 0.0)  # every queue sends
    outage = _Outage(monkeypatch)
    with _open(mlflow_store) as run:
        run.queue_metrics([("val/acc", 0.1, 1)])  # sent
        outage.down = True
        run.queue_metrics([("val/acc", 0.2, 2)])  # fails: kept, training goes on
        run.queue_tags({"data_digest": "abc"})
        run.queue_metrics([("val/acc", 0.3, 3)])  # not even tried
        assert run.lost is not None
        assert outage.calls_while_down == ["log_batch"]
        outage.down = False
        assert run.online() and run.lost is None  # it answers again
    assert "training goes on, and its metrics are kept" in caplog.text
    client = MlflowClient(mlflow_store["uri"])
    r = client.get_run(run.run_id)
    assert r.info.status == "FINISHED" and r.data.tags["data_digest"] == "abc"
    history = client.get_metric_history(run.run_id, "val/acc")
    assert [(m.step, m.value) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]


def test_a_store_gone_until_the_end_leaves_the_run_running_and_its_results_on_disk(
    mlflow_store, compose_cfg, tmp_path, monkeypatch, caplog, capsys
):
    """sweeps.run's path: training goes on after the store fails; at the end the store is
    asked once more, and as it is still gone, the config, history (every epoch), weights
    and unsent metrics are written to disk, the run is left RUNNING without more store
    calls (each would wait through MLflow's retries), and the error says where it all is.
    Once the store answers, ``sweeps.resend`` sends it and the run ends FINISHED."""
    from sweeps.run import UNSENT

    monkeypatch.chdir(tmp_path)
    # params, then epochs 1 and 2 reach it
    error, outage, client, r = _run_with_outage(mlflow_store, compose_cfg, monkeypatch, 0.0, 3)
    assert outage.calls_while_down == ["log_batch", "get_run"]  # the failure, one probe
    assert r.info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val/acc")] == [1, 2]
    kept = tmp_path / "mlruns" / UNSENT / r.info.run_id
    message = str(error)
    assert f"during run {r.info.run_id} (API request to" in message
    assert f"are in {kept.resolve()}; the run is left RUNNING there" in message
    assert (kept / "history.csv").read_text().count("\n") == 1 + 4  # header + every epoch
    assert "epochs: 4" in (kept / "config.yaml").read_text()
    params = np.load(kept / "model" / "params.npz")
    assert set(params.files) >= {"W1", "b1", "W3"}
    unsent = json.loads((kept / "unsent.json").read_text())
    assert unsent["run_id"] == r.info.run_id
    steps = {m["step"] for m in unsent["metrics"] if m["key"] == "val/acc"}
    assert steps == {3, 4}
    assert {m["key"] for m in unsent["metrics"]} >= {"test/acc", "test/loss"}
    assert unsent["tracking_uri"] == mlflow_store["uri"]
    assert f"run {r.info.run_id} is left RUNNING" in caplog.text
    assert message.endswith(f"until they are sent: python -m sweeps.resend {kept.resolve()}")

    # A later sweeps.run ended it KILLED (its process is gone); the store answers again.
    client.set_tag(r.info.run_id, tracking.FAILURE_TAG, "its process (1) died without ending it")
    client.set_terminated(r.info.run_id, status="KILLED")
    outage.down, outage.batches = False, -(10**9)
    assert resend.main([str(kept)]) == 0
    got = client.get_run(r.info.run_id)
    assert got.info.status == "FINISHED" and tracking.FAILURE_TAG not in got.data.tags
    history = client.get_metric_history(r.info.run_id, "val/acc")
    assert [m.step for m in history] == [1, 2, 3, 4]  # every epoch, each once
    assert len(client.get_metric_history(r.info.run_id, "test/acc")) == 1
    assert {"history.csv", "model/params.npz"} <= _artifacts(client, r.info.run_id)
    assert (kept / "sent.json").is_file() and not (kept / "unsent.json").exists()
    capsys.readouterr()
    assert resend.main([str(kept)]) == 2  # nothing is sent twice
    assert "was sent already (sent.json)" in capsys.readouterr().err


def test_a_store_that_fails_at_the_runs_last_send_keeps_its_results_on_disk(
    mlflow_store, compose_cfg, tmp_path, monkeypatch, caplog
):
    """The store took the run's params, then failed its last request (a run shorter than
    the metrics flush interval sends every metric in it): sweeps.run keeps them on disk
    with the weights and history, as for a store lost during training, without asking the
    store again (that request has waited through MLflow's retries already);
    sweeps.resend sends them later."""
    from sweeps.run import UNSENT

    monkeypatch.chdir(tmp_path)
    # the params reach it, the last send not
    error, outage, client, r = _run_with_outage(mlflow_store, compose_cfg, monkeypatch, 3600, 1)
    assert outage.calls_while_down == ["log_batch"]  # the last send; no probe, no end
    assert r.info.status == "RUNNING" and not r.data.metrics and r.data.params
    kept = tmp_path / "mlruns" / UNSENT / r.info.run_id
    assert f"are in {kept.resolve()}" in str(error)
    assert "failed at the run's end" in caplog.text
    unsent = json.loads((kept / "unsent.json").read_text())
    steps = [m["step"] for m in unsent["metrics"] if m["key"] == "val/acc"]
    assert steps == [1, 2, 3, 4]
    assert {"test/acc", "test/loss"} <= {m["key"] for m in unsent["metrics"]}
    assert "data_digest" in unsent["tags"]
    assert (kept / "history.csv").read_text().count("\n") == 1 + 4
    assert set(np.load(kept / "model" / "params.npz").files) >= {"W1", "W3"}

    outage.down, outage.batches = False, -(10**9)
    assert resend.main([str(kept)]) == 0
    got = client.get_run(r.info.run_id)
    assert got.info.status == "FINISHED" and "test/acc" in got.data.metrics
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val/acc")] == [1, 2, 3, 4]


def test_resend_skips_what_an_earlier_send_left_in_the_store(mlflow_store, tmp_path):
    """A resend that failed part way (its first batches stored, a later one not) and is
    run again sends only what the store lacks: no metric twice."""
    client = MlflowClient(mlflow_store["uri"])
    exp = client.create_experiment("kept", artifact_location=mlflow_store["artifacts"])
    run_id = client.create_run(exp).info.run_id
    rows = [
        {"key": "val/acc", "value": 0.1 * s, "timestamp": 1_000 + s, "step": s} for s in (1, 2, 3)
    ]
    rows.append({"key": "test/acc", "value": 0.9, "timestamp": 2_000, "step": 3})
    first = rows[0]  # what the earlier, failed send left
    client.log_metric(run_id, first["key"], first["value"], first["timestamp"], first["step"])
    kept = {"run_id": run_id, "tracking_uri": mlflow_store["uri"], "metrics": rows, "tags": {}}
    (tmp_path / "unsent.json").write_text(json.dumps(kept))
    (tmp_path / "history.csv").write_text("epoch,val/acc\n1,0.1\n")
    assert resend.main([str(tmp_path)]) == 0
    history = client.get_metric_history(run_id, "val/acc")
    assert sorted((m.step, m.timestamp) for m in history) == [(1, 1_001), (2, 1_002), (3, 1_003)]
    assert len(client.get_metric_history(run_id, "test/acc")) == 1
    assert client.get_run(run_id).info.status == "FINISHED"


def test_resend_of_a_folder_of_kept_folders_sends_each_and_names_what_it_could_not(
    mlflow_store, tmp_path, capsys
):
    """``python -m sweeps.resend mlruns/unsent``: every kept folder in it is sent; one it
    cannot read is named and the exit code says so, the others are sent all the same."""
    client = MlflowClient(mlflow_store["uri"])
    exp = client.create_experiment("kept", artifact_location=mlflow_store["artifacts"])
    runs = [client.create_run(exp).info.run_id for _ in range(2)]
    for run_id in runs:
        row = {"key": "val/acc", "value": 0.5, "timestamp": 1_000, "step": 1}
        kept = {"run_id": run_id, "tracking_uri": mlflow_store["uri"], "metrics": [row]}
        (tmp_path / run_id).mkdir()
        (tmp_path / run_id / "unsent.json").write_text(json.dumps({**kept, "tags": {}}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "unsent.json").write_text("{not json")
    assert resend.main([str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert all(f"sent {tmp_path / r} to run {r}, now FINISHED" in out for r in runs)
    assert f"cannot read {tmp_path / 'broken' / 'unsent.json'}" in err
    assert [client.get_run(r).info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert resend.main([str(tmp_path)]) == 2  # the broken one is left; nothing sent twice
    assert "sent" not in capsys.readouterr().out


def test_two_resends_of_a_folder_at_once_create_its_run_once(mlflow_store, tmp_path):
    """A launcher's end sends a study's kept folders while a user may be sending them by
    hand: the two take turns on the folder, and a run the store never created is created
    once (the second finds the folder sent)."""
    import threading

    client = MlflowClient(mlflow_store["uri"])
    exp = client.create_experiment("kept", artifact_location=mlflow_store["artifacts"])
    kept = {
        "run_id": None,
        "tracking_uri": mlflow_store["uri"],
        "create": {"experiment_id": exp, "tags": {"trial_number": "0"}, "run_name": "t0"},
        "metrics": [{"key": "val/acc", "value": 0.5, "timestamp": 1_000, "step": 1}],
        "tags": {},
    }
    (tmp_path / "unsent.json").write_text(json.dumps(kept))
    real, inside = tracking.get_client, threading.Barrier(2, timeout=2)
    outcomes: list[object] = []

    def get_client(uri):  # the first resend waits here, under the folder's lock, for the
        with contextlib.suppress(threading.BrokenBarrierError):  # second to start
            inside.wait()
        return real(uri)

    def send():
        try:
            outcomes.append(resend.resend(tmp_path))
        except ValueError as e:
            outcomes.append(str(e))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(tracking, "get_client", get_client)
        threads = [threading.Thread(target=send) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert len(outcomes) == 2
    sent = [o for o in outcomes if isinstance(o, tuple)]
    assert len(sent) == 1 and sent[0][1] == "FINISHED"
    assert [o for o in outcomes if isinstance(o, str)] == [
        f"{tmp_path} was sent already (sent.json); nothing to send"
    ]
    assert [r.info.run_name for r in client.search_runs([exp])] == ["t0"]


def test_ctrl_c_while_the_store_is_lost_leaves_the_run_running_without_waiting_for_it(
    mlflow_store, monkeypatch
):
    monkeypatch.setattr(tracking, "METRICS_FLUSH_SECONDS", 0.0)
    outage = _Outage(monkeypatch)
    with pytest.raises(KeyboardInterrupt) as e, _open(mlflow_store) as run:
        outage.down = True
        run.queue_metrics([("val/acc", 0.2, 1)])  # fails: the store is lost
        raise KeyboardInterrupt
    assert tracking.left_running(e.value)
    assert outage.calls_while_down == ["log_batch"]  # no flush, tag or end that would wait
    outage.down = False
    assert MlflowClient(mlflow_store["uri"]).get_run(run.run_id).info.status == "RUNNING"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "holds no unsent.json: not a folder sweeps.run kept a run in"),
        ("{not json", "cannot read"),
        ('{"run_id": "x"}', "lacks tracking_uri, metrics, tags: not written by sweeps.run"),
        (
            '{"run_id": null, "tracking_uri": "u", "metrics": [], "tags": {}}',
            "lacks create: not written by sweeps.run",  # no run, and nothing to create it
        ),
    ],
    ids=["no file", "not json", "not ours", "no run to send to"],
)
def test_resend_refuses_a_folder_it_cannot_send_before_touching_a_store(
    tmp_path, monkeypatch, capsys, content, expected
):
    monkeypatch.setattr(tracking, "get_client", lambda uri: pytest.fail("a store was opened"))
    if content is not None:
        (tmp_path / "unsent.json").write_text(content)
    assert resend.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and str(tmp_path) in err


class _Server:
    """A tracking server's client for ``tracking.Run``: ``health`` is what its health check
    answers, ``takes`` whether log_batch succeeds (one that fails has reached the store all
    the same, its answer lost on the way back)."""

    tracking_uri = "http://127.0.0.1:5999"

    def __init__(self, monkeypatch) -> None:
        from sweeps import stores

        self.health, self.takes = True, True
        self.checks: list[bool] = []  # what each health check answered
        self.sent: list[list[tuple[str, int]]] = []
        self.stored: list = []
        self.asked: list[str] = []  # metric-history requests

        def check(uri, what, timeout):
            self.checks.append(self.health)
            if not self.health:
                raise stores.StoreError("the MLflow tracking store does not answer")

        monkeypatch.setattr(stores, "check_reachable", check)
        monkeypatch.setattr(tracking, "METRICS_FLUSH_SECONDS", 0.0)
        monkeypatch.setattr(tracking, "PROBE_SECONDS", 0.0)

    def log_batch(self, run_id, metrics, params, tags, synchronous):
        from mlflow.exceptions import MlflowException

        self.sent.append([(m.key, m.step) for m in metrics])
        self.stored += metrics
        if not self.takes:
            raise MlflowException("Max retries exceeded")

    def get_metric_history(self, run_id, key):
        self.asked.append(key)
        return [m for m in self.stored if m.key == key]

    def get_run(self, run_id):
        self.asked.append(f"get_run {run_id}")


def test_a_lost_tracking_server_is_asked_again_while_training_goes_on(monkeypatch):
    """Once the server answers its health check again, sending resumes during training, the
    kept metrics first: a server restart does not leave the run's curves blank until its
    end. While it does not answer, no request goes to it but the health check."""
    server = _Server(monkeypatch)
    run = tracking.Run(server, "r1", "file:///unused")
    run.queue_metrics([("val/acc", 0.1, 1)])
    server.takes = False
    run.queue_metrics([("val/acc", 0.2, 2)])  # its health check passes, the send fails: lost
    server.health = False
    run.queue_metrics([("val/acc", 0.3, 3)])  # health check only
    assert run.lost is not None and server.checks == [True, True, False]
    server.health = server.takes = True
    run.queue_metrics([("val/acc", 0.4, 4)])  # back: everything kept goes, in order
    assert run.lost is None and server.checks == [True, True, False, True]
    # step 2's failed request had reached the store: it is not sent again
    assert server.sent == [[("val/acc", 1)], [("val/acc", 2)], [("val/acc", 3), ("val/acc", 4)]]
    assert [m.step for m in server.stored] == [1, 2, 3, 4] and server.asked == ["val/acc"]
    run.queue_metrics([("val/acc", 0.5, 5)])  # and from then on, no more history requests
    assert server.sent[-1] == [("val/acc", 5)] and server.asked == ["val/acc"]


def test_a_tracking_server_that_went_down_is_lost_before_a_send_waits_for_it(monkeypatch):
    """Before each send during training the server's health check (2 s at most) is asked:
    one that is down is lost at once, without a send that would wait through MLflow's
    retries (about 4 minutes with its defaults), and training goes on."""
    server = _Server(monkeypatch)
    run = tracking.Run(server, "r1", "file:///unused")
    run.queue_metrics([("val/acc", 0.1, 1)])
    server.health = server.takes = False
    run.queue_metrics([("val/acc", 0.2, 2)])
    assert run.lost is not None and "does not answer" in str(run.lost)
    assert server.sent == [[("val/acc", 1)]]  # no send tried while it was down
    assert run.unsent()["metrics"][0]["step"] == 2  # kept
    # at the end, a server that still fails its health check is not asked through MLflow's
    # retries: the run's records are kept for sweeps.resend
    assert not run.online() and server.asked == [] and server.checks[-1] is False
    assert "does not answer" in str(run.lost)  # the failure during training, kept
    server.health = True
    assert not run.online()  # given up: asked no more


def test_dataset_inputs_from_shapes_are_what_the_arrays_give():
    """A worker sends its writer a dataset's shapes and dtypes, not its arrays: MLflow's
    record built from them is the one from_numpy makes of the arrays themselves."""
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.entities import DatasetInput, InputTag

    rng = np.random.default_rng(0)
    x, t = rng.random((7, 1, 3, 3), dtype=np.float32), rng.integers(0, 10, 7)
    (made,) = tracking.dataset_inputs([tracking.DatasetSpec.of(x, t, "d", "0123abcd", "val")])
    real = DatasetInput(
        from_numpy(
            x, source=tracking.dataset_source(), targets=t, name="d", digest="0123abcd"
        )._to_mlflow_entity(),
        tags=[InputTag("mlflow.data.context", "val")],
    )
    assert made.to_proto() == real.to_proto()
    assert json.loads(made.dataset.profile)["features_nbytes"] == x.nbytes


def test_resend_creates_a_run_in_the_experiment_its_worker_named(mlflow_store, tmp_path):
    """A worker names its run's experiment (``writer.ExperimentName``), not its id: a kept
    run never created is created by resend in that experiment, whatever its id, and in a
    new one of that name, with artifacts under the root kept, if the store has none (a
    store other than the one the worker wrote to)."""
    client = MlflowClient(mlflow_store["uri"])
    client.create_experiment("other")  # ids shift: the name, not a number, finds it
    exp = client.create_experiment("named", artifact_location=mlflow_store["artifacts"])
    root = tmp_path / "elsewhere"
    for name in ("named", "new"):
        kept = {
            "run_id": None,
            "tracking_uri": mlflow_store["uri"],
            "create": {
                "experiment_name": name,
                "artifact_root": str(root),
                "tags": {"trial_number": "0"},
                "run_name": f"in-{name}",
            },
            "metrics": [{"key": "val/acc", "value": 0.5, "timestamp": 1_000, "step": 1}],
            "tags": {},
        }
        (tmp_path / name).mkdir()
        (tmp_path / name / "unsent.json").write_text(json.dumps(kept))
        run_id, status = resend.resend(tmp_path / name)
        run = client.get_run(run_id)
        assert status == "FINISHED" and run.info.run_name == f"in-{name}"
        experiment = client.get_experiment(run.info.experiment_id)
        assert experiment.name == name
    assert client.get_experiment_by_name("named").experiment_id == exp
    assert client.get_experiment_by_name("new").artifact_location == root.as_uri()
