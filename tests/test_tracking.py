"""The local MLflow store under concurrent use."""

from __future__ import annotations

import subprocess
import sys

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
    import time

    from mlflow import MlflowClient

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
