"""Every notebook in notebooks/ runs end to end on the quick setting: synthetic data, tiny
runs launched through the package, a temporary MLflow store and Optuna storage. So a change
in the package that breaks a notebook fails CI."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6, [p.name for p in NOTEBOOKS]


def test_notebooks_are_committed_without_outputs():
    """Outputs depend on the store a notebook ran against; the repository keeps the source."""
    import nbformat

    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        dirty = [
            i
            for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and (c.outputs or c.execution_count)
        ]
        assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_the_quick_setting(path, mlflow_store, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("SWEEPS_QUICK", "1")
    monkeypatch.setenv("SWEEPS_TRACKING_URI", mlflow_store["uri"])
    monkeypatch.setenv("SWEEPS_ARTIFACT_ROOT", mlflow_store["artifacts"])
    monkeypatch.setenv("SWEEPS_OPTUNA_STORAGE", str(tmp_path / "optuna" / "journal.log"))
    monkeypatch.setenv("SWEEPS_LAUNCH", "1")
    monkeypatch.delenv("SWEEPS_DATA", raising=False)
    # The kernel spec runs `python -m ipykernel_launcher`: make that this interpreter.
    monkeypatch.setenv(
        "PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
    )
    client.execute()  # raises CellExecutionError naming the cell on the first failure

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert figures, f"{path.name} drew no figure"
    text = "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
    assert "QUICK" in text, "the notebook did not report the quick setting"
    assert not (NOTEBOOK_DIR / "mlruns").exists(), "the notebook wrote into the project"
