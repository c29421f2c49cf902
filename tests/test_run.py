"""End-to-end tests of ``python -m sweeps.run``: real subprocesses on tiny synthetic data
against a throwaway MLflow store, checked with MlflowClient. Each subprocess pays a few
seconds of imports, so one run carries many checks and independent runs go in parallel.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from omegaconf import OmegaConf

import children
import sweeps
from sweeps.config import GROUPS, conf_dir, validate
from sweeps.run import execute
from sweeps.tracking import (
    FAILURE_TAG,
    HOST_TAG,
    MACHINE_TAG,
    PROCESS_TAG,
    Terminated,
    flatten,
    open_run,
    signals_held,
    sigterm_as_interrupt,
)

TINY = ["data=synthetic", "model.hidden_sizes=[16,16]", "trainer.epochs=2"]
NO_FIGURES = "mlflow.log_figures=false"  # drawing costs about a second per run


def _default_sigint() -> None:
    # A child started from a shell without job control inherits SIGINT ignored, and Python
    # then never raises KeyboardInterrupt; restore the default so Ctrl-C behaves as on a tty.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _command(args: Sequence[str], store: dict[str, str] | None) -> list[str]:
    cmd = [sys.executable, "-m", "sweeps.run", *args]
    if store is not None:
        cmd += [f"mlflow.tracking_uri={store['uri']}", f"mlflow.artifact_root={store['artifacts']}"]
    return cmd


def start(args: Sequence[str], cwd: Path, store: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "SWEEPS_DATA_DIR": str(cwd / "no-mnist-here")}
    env.pop("MLFLOW_TRACKING_URI", None)
    return children.popen(
        _command(args, store),
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_default_sigint,
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"sweeps.run did not finish in {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(
    args: Sequence[str], cwd: Path, store: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return finish(start(args, cwd, store))


def all_runs(store: dict[str, str]) -> list:
    client = MlflowClient(tracking_uri=store["uri"])
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, order_by=["attributes.start_time ASC"])


def copy_store(store: dict[str, str], name: str) -> dict[str, str]:
    """A second fresh store next to the fixture's (before anything wrote to it)."""
    root = Path(store["dir"]).parent / name
    root.mkdir()
    shutil.copy(Path(store["dir"]) / "mlflow.db", root / "mlflow.db")
    return {
        "uri": f"sqlite:///{root / 'mlflow.db'}",
        "artifacts": str(root / "artifacts"),
        "dir": str(root),
    }


def histories(client: MlflowClient, run) -> dict[str, list[tuple[int, float]]]:
    """Every metric's (step, value) history, except wall-clock times."""
    return {
        key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        for key in sorted(run.data.metrics)
        if not key.startswith("time/")
    }


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for a in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, a.path) if a.is_dir else {a.path}
    return out


# -- a full run ------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_run_records_everything(tmp_path, mlflow_store, compose_cfg):
    overrides = [
        *TINY,
        "optimizer=adam",
        "init=xavier",
        "trainer.batch_size=48",
        "seed=3",
        "mlflow.batch_loss_every=1",
    ]
    result = run(overrides, tmp_path, mlflow_store)
    assert result.returncode == 0, result.stderr

    runs = all_runs(mlflow_store)
    assert len(runs) == 1
    r = runs[0]
    run_id = r.info.run_id
    client = MlflowClient(tracking_uri=mlflow_store["uri"])
    assert r.info.status == "FINISHED"

    # The summary: validation and test accuracy, the run id, how to open the UI.
    out = result.stdout
    assert re.search(r"val acc\s+\d\.\d{4}", out)
    assert re.search(r"test acc\s+\d\.\d{4}", out)
    assert f"MLflow run {run_id}" in out
    assert f"mlflow ui --backend-store-uri {mlflow_store['uri']}" in out

    # Params: the whole resolved config, flattened.
    cli = [
        *overrides,
        f"mlflow.tracking_uri={mlflow_store['uri']}",
        f"mlflow.artifact_root={mlflow_store['artifacts']}",
    ]
    resolved = OmegaConf.to_container(compose_cfg(cli), resolve=True)
    expected = {k: str(v) for k, v in flatten(resolved).items()}
    params = r.data.params
    assert params == expected
    assert params["optimizer.name"] == "adam" and params["optimizer.lr"] == "0.001"
    assert params["model.hidden_sizes"] == "[16, 16]"
    assert params["trainer.batch_size"] == "48" and params["seed"] == "3"

    # Tags.
    tags = r.data.tags
    assert {g: tags[g] for g in GROUPS} == {
        "data": "synthetic",
        "model": "mlp",
        "optimizer": "adam",
        "init": "xavier",
        "activation": "relu",
        "batchnorm": "off",
        "dropout": "off",
        "weight_decay": "off",
    }
    assert tags["seed"] == "3"
    assert re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"])
    assert tags["git_dirty"] in ("true", "false")
    assert tags["overrides"] == " ".join(cli)
    assert tags["sweeps_version"] == sweeps.__version__
    assert re.fullmatch(r"[0-9a-f]{16}", tags["data_digest"])
    assert "sweep_id" not in tags and FAILURE_TAG not in tags

    # Metrics: per epoch with the epoch as step; batch losses per iteration; test once.
    # 600 synthetic samples, 20% held out: 480 to train on, 10 batches of 48 per epoch.
    h = histories(client, r)
    for key in (
        "train/loss",
        "train/acc",
        "val/loss",
        "val/acc",
        "act/1/mean",
        "act/1/std",
        "act/1/dead",
        "act/2/mean",
        "act/2/dead",
    ):
        assert [s for s, _ in h[key]] == [1, 2], key
    for key in ("train/acc", "val/acc", "act/1/dead", "act/2/dead"):
        assert all(0 <= v <= 1 for _, v in h[key]), key
    assert [s for s, _ in h["train/batch_loss"]] == list(range(1, 21))
    assert [s for s, _ in h["test/acc"]] == [2] and [s for s, _ in h["test/loss"]] == [2]
    assert 0 <= h["test/acc"][0][1] <= 1
    assert f"{h['val/acc'][-1][1]:.4f}" in out and f"{h['test/acc'][0][1]:.4f}" in out
    assert [m.step for m in client.get_metric_history(run_id, "time/epoch")] == [1, 2]

    # Artifacts.
    assert {
        "config.yaml",
        "overrides.yaml",
        "history.csv",
        "learning_curve.png",
        "activations/init.png",
        "activations/final.png",
        "model/params.npz",
    } <= artifact_paths(client, run_id)
    dl = tmp_path / "download"
    config = yaml.safe_load(
        Path(client.download_artifacts(run_id, "config.yaml", str(dl))).read_text()
    )
    assert config["optimizer"]["name"] == "adam" and config["model"]["hidden_sizes"] == [16, 16]
    assert (
        yaml.safe_load(
            Path(client.download_artifacts(run_id, "overrides.yaml", str(dl))).read_text()
        )
        == cli
    )
    with np.load(
        client.download_artifacts(run_id, "model/params.npz", str(dl)), allow_pickle=False
    ) as z:
        shapes = {k: z[k].shape for k in z.files}
    assert shapes == {
        "W1": (784, 16),
        "b1": (16,),
        "W2": (16, 16),
        "b2": (16,),
        "W3": (16, 10),
        "b3": (10,),
    }
    png = Path(client.download_artifacts(run_id, "learning_curve.png", str(dl))).read_bytes()
    assert png.startswith(b"\x89PNG")

    # Dataset inputs: the training and validation splits, with the data digest.
    inputs = {
        d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags})
        for d in r.inputs.dataset_inputs
    }
    assert inputs == {
        "synthetic-train": (tags["data_digest"], {"mlflow.data.context": "training"}),
        "synthetic-val": (tags["data_digest"], {"mlflow.data.context": "validation"}),
    }


# -- bad input -------------------------------------------------------------------------------

BAD_INPUT = {
    "optimizer=adamm": [
        "Could not find 'optimizer/adamm'",
        "Available options in 'optimizer'",
        "adagrad",
        "adam",
        "momentum",
        "nesterov",
        "rmsprop",
        "sgd",
    ],
    "optimizer.lrr=1": ["Could not override 'optimizer.lrr'"],
    "optimizer.lr=-1": [
        "error: invalid config: optimizer.lr must be a finite number > 0, got -1.0"
    ],
    "dropout.ratio=1.5": ["error: invalid config: dropout.ratio must be in [0, 1), got 1.5"],
    "trainer.batch_size=0": [
        "error: invalid config: trainer.batch_size must be an integer >= 1, got 0"
    ],
    "data.val_fraction=0.9999": [
        "error: invalid config: data.val_fraction=0.9999 of 600 training samples gives 600 "
        "validation and 0 training samples; both must be >= 1"
    ],
    "mlflow.experiment_name=": [
        "error: invalid config: mlflow.experiment_name must be a non-empty name, got ''"
    ],
}


@pytest.mark.slow
def test_bad_input_fails_before_any_run_is_created(tmp_path, mlflow_store):
    procs = {bad: start([*TINY, bad], tmp_path, mlflow_store) for bad in BAD_INPUT}
    for bad, proc in procs.items():
        result = finish(proc)
        assert result.returncode != 0, bad
        for fragment in BAD_INPUT[bad]:
            assert fragment in result.stderr, (bad, result.stderr)
        assert "epoch" not in result.stdout + result.stderr  # no training started
        assert "Traceback" not in result.stderr
    client = MlflowClient(tracking_uri=mlflow_store["uri"])
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert all_runs(mlflow_store) == []


@pytest.mark.slow
def test_a_store_it_cannot_use_stops_it_before_any_work(tmp_path):
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cases = {
        f"mlflow.tracking_uri=http://127.0.0.1:{port}": (
            f"error: the MLflow tracking store at http://127.0.0.1:{port} does not answer ("
        ),
        "mlflow.tracking_uri=ftp://x": "error: invalid config: mlflow.tracking_uri 'ftp://x' is",
        "mlflow.artifact_root=/proc/sweeps/artifacts": (
            "error: cannot make mlflow.artifact_root /proc/sweeps/artifacts: No such file or "
            "directory (/proc/sweeps)"
        ),
    }
    procs = {}
    for i, bad in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        procs[bad] = start([*TINY, bad], tmp_path / str(i))
    for i, (bad, proc) in enumerate(procs.items()):
        result = finish(proc, timeout=60)
        assert result.returncode == 2, (bad, result.stderr)
        assert result.stderr.startswith(cases[bad]), (bad, result.stderr)
        assert "Traceback" not in result.stderr and "epoch" not in result.stdout
        made = {
            p.relative_to(tmp_path / str(i)).as_posix() for p in (tmp_path / str(i)).glob("*/*")
        }
        assert made == {"mlruns/hydra"}, bad  # Hydra's run folder, no store, no artifacts


def test_an_experiment_it_cannot_record_into_stops_it_before_any_work(tmp_path, mlflow_store):
    """A deleted experiment, or an mlflow.artifact_root the existing experiment cannot take:
    exit 2 with one line naming the value, before a run is created."""
    client = MlflowClient(tracking_uri=mlflow_store["uri"])
    client.delete_experiment(client.create_experiment("gone"))
    client.create_experiment(
        "kept", artifact_location=Path(mlflow_store["artifacts"]).resolve().as_uri()
    )
    elsewhere = tmp_path / "elsewhere"
    uri = f"mlflow.tracking_uri={mlflow_store['uri']}"
    cases = {
        ("mlflow.experiment_name=gone",): "error: MLflow experiment 'gone' is deleted; restore it",
        ("mlflow.experiment_name=kept", f"mlflow.artifact_root={elsewhere}"): (
            f"error: mlflow.artifact_root={elsewhere} cannot apply: MLflow experiment 'kept' "
            "keeps its artifacts in file://"
        ),
    }
    procs = {bad: start([*TINY, uri, *bad], tmp_path) for bad in cases}
    for bad, proc in procs.items():
        result = finish(proc, timeout=60)
        assert result.returncode == 2, (bad, result.stderr)
        assert result.stderr.startswith(cases[bad]), (bad, result.stderr)
        assert "Traceback" not in result.stderr and "epoch" not in result.stdout
    assert all_runs(mlflow_store) == []


# -- interrupted runs --------------------------------------------------------------------------


def _wait_for_running(store: dict[str, str], proc: subprocess.Popen, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"sweeps.run ended early ({proc.returncode}):\n{proc.stderr.read()[-3000:]}"
            )
        try:
            runs = all_runs(store)
        except Exception:  # the child may be creating the experiment right now
            runs = []
        if runs and runs[0].info.status == "RUNNING":
            return runs[0].info.run_id
        time.sleep(0.2)
    proc.kill()
    pytest.fail("the run never showed up as RUNNING")


@pytest.mark.slow
def test_a_run_whose_process_was_killed_is_ended_by_the_next_run(tmp_path, mlflow_store):
    """SIGKILL lets no process end its run: the next sweeps.run on this machine ends it
    KILLED, and a run of an earlier boot of this machine too. A live run, a search's run, a
    run of another machine (even one with this host name) and a run of another pid
    namespace (another container, or this one before a restart) are left RUNNING."""
    long_run = ["data=synthetic", "trainer.epochs=100000", NO_FIGURES]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    killed = start(long_run, tmp_path / "a", mlflow_store)
    dead_id = _wait_for_running(mlflow_store, killed)
    alive = start(long_run, tmp_path / "b", mlflow_store)
    deadline = time.monotonic() + 90
    while len([r for r in all_runs(mlflow_store) if r.info.status == "RUNNING"]) < 2:
        assert time.monotonic() < deadline and alive.poll() is None, "no second run"
        time.sleep(0.2)
    alive_id = next(r.info.run_id for r in all_runs(mlflow_store) if r.info.run_id != dead_id)
    killed.kill()
    killed.wait()
    client = MlflowClient(tracking_uri=mlflow_store["uri"])
    dead_tags = client.get_run(dead_id).data.tags
    assert client.get_run(dead_id).info.status == "RUNNING"
    exp = client.get_experiment_by_name("sweeps").experiment_id
    space, pid, started = dead_tags[PROCESS_TAG].rsplit("/", 2)
    boot, ns = space.split("/")
    here = {HOST_TAG: dead_tags[HOST_TAG], MACHINE_TAG: dead_tags.get(MACHINE_TAG, "")}
    others = {
        "search": {PROCESS_TAG: dead_tags[PROCESS_TAG], "sweeps.role": "trial"},
        "elsewhere": {PROCESS_TAG: f"another-boot/1/{pid}/{started}"},
        "namesake": {
            PROCESS_TAG: f"another-boot/{ns}/{pid}/{started}",
            HOST_TAG: dead_tags[HOST_TAG],
            MACHINE_TAG: "another-machine",
        },
        "other namespace": {PROCESS_TAG: f"{boot}/{int(ns) + 1}/{pid}/{started}", **here},
    }
    kept = {k: client.create_run(exp, tags=tags).info.run_id for k, tags in others.items()}
    rebooted = client.create_run(
        exp, tags={PROCESS_TAG: f"earlier-boot/{ns}/{os.getpid()}/{started}", **here}
    ).info.run_id

    result = run(["data=synthetic", "trainer.epochs=1", NO_FIGURES], tmp_path, mlflow_store)
    assert result.returncode == 0, result.stderr
    assert f"run {dead_id} was left RUNNING by a process that died: ended KILLED" in (
        result.stdout + result.stderr
    )
    dead = client.get_run(dead_id)
    assert dead.info.status == "KILLED" and dead.info.end_time is not None
    assert dead.data.tags[FAILURE_TAG] == f"its process ({pid}) died without ending it"
    for run_id in (alive_id, *kept.values()):
        assert client.get_run(run_id).info.status == "RUNNING", run_id
    # without a machine id (many containers), an earlier boot is not told from another machine
    expected = "KILLED" if dead_tags.get(MACHINE_TAG) else "RUNNING"
    assert client.get_run(rebooted).info.status == expected
    alive.send_signal(signal.SIGINT)
    assert finish(alive, timeout=60).returncode == 130
    assert client.get_run(alive_id).info.status == "KILLED"


@pytest.mark.slow
def test_an_interrupted_untracked_run_claims_no_run(tmp_path):
    proc = start(["data=synthetic", "trainer.epochs=100000", "mlflow.enabled=false"], tmp_path)
    deadline = time.monotonic() + 90
    while not any(
        "epoch   1 |" in p.read_text() for p in tmp_path.glob("mlruns/hydra/*/*/run.log")
    ):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no epoch logged ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    result = finish(proc, timeout=60)
    assert result.returncode == 130, result.stderr
    assert result.stderr.endswith("\ninterrupted (Ctrl-C)\n"), result.stderr[-500:]


@pytest.mark.slow
def test_sigint_and_sigterm_end_the_run_as_killed(tmp_path, mlflow_store):
    long_run = ["data=synthetic", "model.hidden_sizes=[64,64]", "trainer.epochs=100000", NO_FIGURES]
    cases = {
        signal.SIGINT: (mlflow_store, 130),
        signal.SIGTERM: (copy_store(mlflow_store, "sigterm"), 143),
    }
    procs = {sig: start(long_run, tmp_path, store) for sig, (store, _) in cases.items()}
    for sig, proc in procs.items():
        store, code = cases[sig]
        run_id = _wait_for_running(store, proc)
        proc.send_signal(sig)
        result = finish(proc, timeout=60)
        assert result.returncode == code != 0, (sig, result.stderr)
        why = "Ctrl-C" if sig == signal.SIGINT else f"received signal {int(sig)}"
        assert f"interrupted ({why}); the MLflow run is marked KILLED" in result.stderr
        r = MlflowClient(tracking_uri=store["uri"]).get_run(run_id)
        assert r.info.status == "KILLED", sig
        assert r.info.end_time is not None
        assert r.data.tags[FAILURE_TAG].startswith("interrupted")


def test_a_command_left_running_by_a_test_is_killed():
    proc = children.popen([sys.executable, "-c", "import time; time.sleep(120)"])
    assert children.kill_leftovers() == [proc]
    assert proc.returncode == -signal.SIGKILL
    assert children.STARTED == []


def test_an_interrupt_wrapped_by_omegaconf_inside_a_run_ends_it_killed(
    mlflow_store, compose_cfg, monkeypatch
):
    """Seen in a fresh-clone CI run: SIGINT landed while execute wrote config.yaml (then
    through OmegaConf), came out as an OmegaConf error, and the command exited 1 instead of
    130."""
    import sweeps.run as R

    def wrapped(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ValueError("omegaconf-ish error") from None  # __context__: the interrupt

    monkeypatch.setattr(R.tracking, "config_yaml", wrapped)
    overrides = [
        "data=synthetic",
        "model.hidden_sizes=[8]",
        "trainer.epochs=1",
        NO_FIGURES,
        f"mlflow.tracking_uri={mlflow_store['uri']}",
        f"mlflow.artifact_root={mlflow_store['artifacts']}",
    ]
    dcfg = compose_cfg(overrides)
    with pytest.raises(KeyboardInterrupt):
        execute(validate(dcfg), OmegaConf.to_container(dcfg, resolve=True), overrides)
    (r,) = all_runs(mlflow_store)
    assert r.info.status == "KILLED"
    assert r.data.tags[FAILURE_TAG].startswith("interrupted")


def test_a_signal_during_a_store_call_is_delivered_when_it_returns():
    steps = []
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), signals_held():
        os.kill(os.getpid(), signal.SIGINT)
        steps.append("the store call finished")
    assert steps == ["the store call finished"]
    assert signal.getsignal(signal.SIGINT) is previous
    # SIGTERM goes to the handler that was there before: sigterm_as_interrupt's.
    with pytest.raises(Terminated), sigterm_as_interrupt(), signals_held():
        os.kill(os.getpid(), signal.SIGTERM)
        steps.append("again")
    assert steps[-1] == "again"


def test_a_second_signal_during_a_store_call_is_delivered_at_once():
    steps = []
    with pytest.raises(KeyboardInterrupt), signals_held():
        os.kill(os.getpid(), signal.SIGINT)
        steps.append("first signal held")
        os.kill(os.getpid(), signal.SIGINT)
        steps.append("not reached")
    assert steps == ["first signal held"]


def test_interrupt_inside_a_store_write_ends_the_run_killed(mlflow_store, monkeypatch):
    """An interrupt inside MLflow's SQLAlchemy code could leave the SQLite database locked,
    and the run RUNNING; the write now completes first, then the run is marked KILLED."""
    original = MlflowClient.log_batch
    interrupted = []

    def log_batch_with_ctrl_c(self, *args, **kwargs):
        if not interrupted:  # Ctrl-C once, in the first write
            interrupted.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch_with_ctrl_c)
    run_id = None
    store = (mlflow_store["uri"], "sweeps", mlflow_store["artifacts"])
    with pytest.raises(KeyboardInterrupt), open_run(*store) as run:
        run_id = run.run_id
        run.log_params({"a": 1})
        pytest.fail("the interrupt was lost")
    assert interrupted
    r = MlflowClient(tracking_uri=mlflow_store["uri"]).get_run(run_id)
    assert r.info.status == "KILLED"
    assert r.data.params == {"a": "1"}


# -- divergence ------------------------------------------------------------------------------


@pytest.mark.slow
def test_divergence_ends_the_run_as_failed(tmp_path, mlflow_store):
    # lr 1e20 overflows float32 weights within two updates (1e6 does not: the loss of a
    # softmax net only grows linearly with the weights).
    result = run([*TINY, NO_FIGURES, "optimizer=sgd", "optimizer.lr=1e20"], tmp_path, mlflow_store)
    assert result.returncode == 1
    assert "diverged at epoch 1" in result.stderr
    assert "the MLflow run is marked FAILED" in result.stderr
    (r,) = all_runs(mlflow_store)
    assert r.info.status == "FAILED"
    assert "diverged at epoch 1" in r.data.tags[FAILURE_TAG]


# -- multirun and seeds ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def multirun_and_single(tmp_path_factory, _mlflow_template):
    """At the same time, each in its own process and store: ``-m optimizer=sgd,adam
    seed=0,1``; a single run of ``optimizer=adam seed=1``; and ``-m
    experiment=overfit_weight_decay``, which sweeps by itself (hydra.sweeper.params)."""
    overlay = ["data.synthetic_train=400", "trainer.iterations=2", "model.hidden_sizes=[8]"]
    stores, procs = {}, {}
    for name, args in (
        ("multi", ["-m", *TINY, NO_FIGURES, "optimizer=sgd,adam", "seed=0,1"]),
        ("single", [*TINY, NO_FIGURES, "optimizer=adam", "seed=1"]),
        ("overlay", ["-m", "experiment=overfit_weight_decay", *TINY, NO_FIGURES, *overlay]),
    ):
        root = tmp_path_factory.mktemp(name)
        (root / "mlruns").mkdir()
        shutil.copy(_mlflow_template, root / "mlruns" / "mlflow.db")
        stores[name] = {
            "uri": f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
            "artifacts": str(root / "mlruns" / "artifacts"),
            "dir": str(root / "mlruns"),
        }
        procs[name] = start(args, root, stores[name])
    results = {name: finish(proc, timeout=180) for name, proc in procs.items()}
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stderr)
    return {name: (stores[name], results[name]) for name in stores}


@pytest.mark.slow
def test_multirun_gives_one_finished_run_per_job_sharing_a_sweep_id(multirun_and_single):
    store, _ = multirun_and_single["multi"]
    runs = all_runs(store)
    assert len(runs) == 4
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert sorted((r.data.tags["optimizer"], r.data.tags["seed"]) for r in runs) == [
        ("adam", "0"),
        ("adam", "1"),
        ("sgd", "0"),
        ("sgd", "1"),
    ]
    sweep_ids = {r.data.tags.get("sweep_id") for r in runs}
    assert len(sweep_ids) == 1 and re.fullmatch(r"sweep-[0-9a-f]{10}", sweep_ids.pop())
    assert {r.data.params["sweep_id"] for r in runs} == {runs[0].data.tags["sweep_id"]}


@pytest.mark.slow
def test_an_overlay_multirun_sweeps_its_own_grid(multirun_and_single):
    store, _ = multirun_and_single["overlay"]
    runs = all_runs(store)
    assert sorted(r.data.tags["weight_decay"] for r in runs) == ["l2", "off"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["experiment"] for r in runs} == {"overfit_weight_decay"}
    assert len({r.data.tags["sweep_id"] for r in runs}) == 1
    assert {r.data.params["data.train_size"] for r in runs} == {"300"}


@pytest.mark.slow
def test_same_seed_same_history_other_seed_other_history(multirun_and_single):
    (multi_store, _), (single_store, _) = (
        multirun_and_single["multi"],
        multirun_and_single["single"],
    )
    multi = MlflowClient(tracking_uri=multi_store["uri"])
    by_job = {(r.data.tags["optimizer"], r.data.tags["seed"]): r for r in all_runs(multi_store)}
    (single_run,) = all_runs(single_store)
    single = histories(MlflowClient(tracking_uri=single_store["uri"]), single_run)
    # Same seed in another process (and outside a multirun): identical, step by step.
    assert single == histories(multi, by_job["adam", "1"])
    assert single_run.data.tags["data_digest"] == by_job["adam", "1"].data.tags["data_digest"]
    # Another seed: another split, other weights, other batches.
    other = histories(multi, by_job["adam", "0"])
    assert other["train/loss"] != single["train/loss"]
    assert other["train/batch_loss"] != single["train/batch_loss"]


# -- tracking off ----------------------------------------------------------------------------


@pytest.mark.slow
def test_mlflow_disabled_runs_without_a_store(tmp_path):
    result = run([*TINY, "mlflow.enabled=false"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "val acc" in result.stdout and "test acc" in result.stdout
    assert "MLflow run" not in result.stdout
    assert not list(tmp_path.rglob("*.db"))
    assert not (tmp_path / "mlruns" / "artifacts").exists()


def test_an_untracked_run_does_not_build_its_params_or_config_yaml(compose_cfg, monkeypatch):
    """They would go to a NullRun, which drops them: 12 ms of YAML per search trial."""
    import sweeps.run as R

    def built(*args, **kwargs):
        raise AssertionError("built for a run that records nothing")

    monkeypatch.setattr(R.tracking, "config_yaml", built)
    monkeypatch.setattr(R.tracking, "flatten", built)
    overrides = ["data=synthetic", "model.hidden_sizes=[8]", "trainer.epochs=1"]
    dcfg = compose_cfg([*overrides, "mlflow.enabled=false"])
    outcome = execute(validate(dcfg), OmegaConf.to_container(dcfg, resolve=True), overrides)
    assert outcome.run_id is None and outcome.history.last("epoch") == 1


# -- every experiment overlay runs --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml")))
def test_every_experiment_overlay_runs(compose_cfg, name):
    """Each overlay, shrunk to two small updates on synthetic data (enough samples for the
    overlays' train_size) and small evaluations, trains through the same path as the CLI."""
    overrides = [
        f"experiment={name}",
        "data=synthetic",
        "data.synthetic_train=2000",
        "data.synthetic_test=50",
        "data.test_size=null",
        "trainer.epochs=1",
        "trainer.iterations=2",
        "trainer.batch_size=10",
        "trainer.eval_train_size=50",
        "trainer.probe_size=50",
        "mlflow.enabled=false",
    ]
    dcfg = compose_cfg(overrides)
    cfg = validate(dcfg)
    outcome = execute(cfg, OmegaConf.to_container(dcfg, resolve=True), overrides, progress=False)
    assert outcome.run_id is None
    assert outcome.history.last("iteration") == 2
    assert 0 <= outcome.test["test/acc"] <= 1
    no_validation = cfg.data.val_fraction == 0 and cfg.data.validation == "holdout"
    assert (outcome.val_acc is None) == no_validation


@pytest.mark.slow
def test_a_tracking_server_that_goes_away_mid_run_loses_no_result(
    tmp_path, mlflow_server, monkeypatch
):
    """The tracking server goes down after the first metrics reached it: training goes on to
    its last epoch, and the command exits 1 naming the folder that holds the config, every
    epoch's history, the weights and the metrics the server missed; the server's records
    and the folder's together hold every epoch. The run is left RUNNING on the server."""
    import json

    import servers

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # no minutes of retries
    epochs = 300
    args = [
        "data=synthetic",
        "data.synthetic_train=6000",
        f"trainer.epochs={epochs}",
        "mlflow.batch_loss_every=1000",
        NO_FIGURES,
    ]
    proc = start(args, tmp_path, mlflow_server)
    run_id = _wait_for_running(mlflow_server, proc)
    client = MlflowClient(tracking_uri=mlflow_server["uri"])
    deadline = time.monotonic() + 90
    while not client.get_metric_history(run_id, "val/acc"):  # the first send, after 5 s
        assert proc.poll() is None and time.monotonic() < deadline, "no metrics reached it"
        time.sleep(0.2)
    servers.stop_mlflow(mlflow_server)
    result = finish(proc, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"stopped answering during run {run_id} (" in result.stderr
    folder = Path(re.search(r"are in (\S+); the run is left RUNNING", result.stderr)[1])
    assert folder.name == "unsent" and folder.parent.parent.parent.name == "hydra"
    history = (folder / "history.csv").read_text().splitlines()
    assert len(history) == 1 + epochs  # every epoch, the last ones included
    assert f"epochs: {epochs}" in (folder / "config.yaml").read_text()
    assert "W1" in np.load(folder / "model" / "params.npz").files
    unsent = json.loads((folder / "unsent.json").read_text())
    assert unsent["run_id"] == run_id
    kept = {m["step"] for m in unsent["metrics"] if m["key"] == "val/acc"}
    stored_run = MlflowClient(tracking_uri=mlflow_server["db"]).get_run(run_id)
    assert stored_run.info.status == "RUNNING"
    stored = {
        m.step
        for m in MlflowClient(tracking_uri=mlflow_server["db"]).get_metric_history(
            run_id, "val/acc"
        )
    }
    assert stored and kept and stored | kept == set(range(1, epochs + 1))
    assert {m["key"] for m in unsent["metrics"]} >= {"test/acc", "test/loss"}
