"""Servers the tests start on loopback: an MLflow tracking server (the multi-machine setup on
one machine), taken down with its children when the test is done or wants it gone."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pg import free_port

_RUNNING: dict[str, tuple[subprocess.Popen, object]] = {}  # by the store's folder


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to a process started in a session of its own and to all its children (an
    MLflow server's uvicorn worker and job runners), SIGKILL if they are not gone in 30 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


def start_mlflow(root: Path, template: Path) -> dict[str, str]:
    """``mlflow server`` on a free loopback port over a copy of ``template`` in ``root``,
    artifacts proxied by the server (``mlflow-artifacts:``); returns the store: ``uri`` (the
    server), ``artifacts``, ``dir`` and ``db`` (its SQLite database, to read it while the
    server is down)."""
    root.mkdir()
    shutil.copy(template, root / "mlflow.db")
    port = free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed in stop_mlflow
    # MLflow 3's job runners (seven more processes, for GenAI features) took 16 s more CPU
    # in the server's first 18 s here, on the cores the test trains on
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True, env=env
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(proc)
            log.close()
            pytest.fail(
                f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}"
            )
        time.sleep(0.5)
    _RUNNING[str(root)] = (proc, log)
    return {
        "uri": url,
        "artifacts": str(root / "artifacts"),
        "dir": str(root),
        "db": f"sqlite:///{root / 'mlflow.db'}",
    }


def stop_mlflow(store: dict[str, str]) -> None:
    """Take the server of ``store`` down, children included (again: a no-op)."""
    if store["dir"] in _RUNNING:
        proc, log = _RUNNING.pop(store["dir"])
        stop_group(proc)
        log.close()  # type: ignore[attr-defined]
