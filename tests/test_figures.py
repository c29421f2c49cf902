"""``python -m sweeps.figures``: stopping it."""

from __future__ import annotations

import subprocess
import sys

import children

SCRIPT = """
import os, signal, sys, time
from matplotlib.figure import Figure
from sweeps import figures

def drawn(setting):
    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])
    return fig

def terminated(setting):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)  # the signal's exception lands here
    sys.exit("SIGTERM was not turned into an interrupt")

figures.FIGURES = {"first": drawn, "second": terminated, "third": drawn}
os.environ[figures.A.ENV_LAUNCH] = "0"
sys.exit(figures.main(["--out", sys.argv[1]]))
"""


def test_sigterm_stops_it_like_ctrl_c_keeping_the_figures_written(tmp_path):
    """SIGTERM is an interrupt while it draws (a run it trains ends KILLED, a search it runs
    is stopped: ``procs.run_child``), not an exit on the spot: exit 130 with a message, the
    figures drawn before it kept, no later figure drawn."""
    proc = children.popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted (received signal 15); the figures written so far are kept" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["first.png"]
