"""Telling whether the process behind a record is gone: only for processes this machine can
see (its current boot, its pid namespace), and never a reused pid for the original."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import children
from sweeps import procs


def test_a_process_id_names_boot_namespace_pid_and_start():
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    ns = os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    assert procs.process_id() == f"{boot}/{ns}/{os.getpid()}/{procs.process_start(os.getpid())}"
    assert procs.process_start(os.getpid()).isdigit()


def test_only_a_gone_process_of_this_machine_is_dead():
    child = subprocess.Popen(["sleep", "30"])
    ident = procs.process_id(child.pid)
    assert not procs.dead_here(ident)  # alive
    child.kill()
    child.wait()
    assert procs.dead_here(ident)
    space, pid, start = ident.rsplit("/", 2)
    mine = procs.process_id()
    assert not procs.dead_here(mine)
    # the same pid, started at another time: a reused pid, the original is gone
    own_pid, own_start = mine.rsplit("/", 2)[1:]
    assert procs.dead_here(f"{space}/{own_pid}/{int(own_start) + 1}")
    boot, ns = space.split("/")
    assert not procs.dead_here(f"another-boot/{ns}/{pid}/{start}")  # another machine
    assert not procs.dead_here(f"{boot}/{int(ns) + 1}/{pid}/{start}")  # another container
    for broken in ("", f"{space}/", f"{space}/x/1", f"{space}/{pid}/", "garbage"):
        assert not procs.dead_here(broken), broken


def test_a_record_names_a_gone_process_only_where_this_machine_can_tell():
    child = subprocess.Popen(["sleep", "30"])
    ident, start = procs.process_id(child.pid), procs.process_start(child.pid)
    host, machine = procs.hostname(), procs.machine_id()
    assert not procs.gone(ident, host, child.pid, start)  # alive
    child.kill()
    child.wait()
    assert procs.gone(ident, host, child.pid, start)
    assert procs.gone(ident, host, child.pid, start, certain=True)
    boot, ns, pid, start = ident.split("/")
    me, my_start = os.getpid(), procs.process_start(os.getpid())
    # Another pid namespace of this kernel under this host name: most often this container
    # before a restart, judged by the pid as records always were; not certain.
    other_ns = f"{boot}/{int(ns) + 1}/{pid}/{start}"
    assert procs.gone(other_ns, host, int(pid), start)
    assert not procs.gone(other_ns, host, int(pid), start, certain=True)
    assert not procs.gone(f"{boot}/{int(ns) + 1}/{me}/{my_start}", host, me, my_start)
    if machine:
        # an earlier boot of this machine (a reboot ended it), even with this pid alive now
        earlier = f"earlier-boot/{ns}/{me}/{my_start}"
        assert procs.gone(earlier, host, me, my_start, machine, certain=True)
        # another machine that merely shares the host name, even with that pid free here
        assert not procs.gone(f"its-boot/{ns}/{pid}/{start}", host, int(pid), start, "other")
    assert not procs.gone(f"its-boot/{ns}/{pid}/{start}", "another-host", int(pid), start)
    # a record without an ident (an older version's): by host name and pid
    assert procs.gone("", host, int(pid), start)
    assert not procs.gone("", host, int(pid), start, certain=True)
    assert not procs.gone("", "another-host", int(pid), start)
    assert not procs.gone("", host, me, my_start)


def test_this_process_is_told_by_its_ident_where_the_record_has_one():
    mine, host = procs.process_id(), procs.hostname()
    assert procs.is_this_process(mine, host, os.getpid())
    boot, ns, pid, start = mine.split("/")
    # the same pid in another container with the same host name is another process
    assert not procs.is_this_process(f"{boot}/{int(ns) + 1}/{pid}/{start}", host, os.getpid())
    assert procs.is_this_process("", host, os.getpid())  # an older record: host and pid
    assert not procs.is_this_process("", "another-host", os.getpid())


CHILD = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    time.sleep(1.0)  # ending its work: a run's end, a study's report
    out.write_text(f"ended its work on signal {signum}")
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
(out.parent / "started").write_text("")
time.sleep(60)
"""

PARENT = """
import sys
from sweeps import procs, tracking
try:
    with tracking.sigterm_as_interrupt():
        procs.run_child([sys.executable, "-c", sys.argv[1], sys.argv[2]])
except KeyboardInterrupt:
    sys.exit(42)
"""


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setsid()  # a terminal's foreground group: Ctrl-C reaches parent and child


@pytest.mark.parametrize(
    "sig, group",
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c to the group", "sigterm to the parent"],
)
def test_a_child_gets_to_end_its_work_after_an_interrupt(tmp_path, sig, group):
    """Ctrl-C reaches a command and the child it waits for (``sweeps.compare --seeds`` and
    its ``sweeps.run -m``). ``subprocess.run`` would kill the child 0.25 s later, in the
    middle of ending its run; ``run_child`` lets it end (here in 1 s), then the interrupt
    goes on in the parent. SIGTERM reaches the parent only: it is passed on."""
    out = tmp_path / "out.txt"
    parent = children.popen(
        [sys.executable, "-c", PARENT, CHILD, str(out)], preexec_fn=_default_sigint
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists():
        assert parent.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    if group:
        os.killpg(parent.pid, sig)
    else:
        parent.send_signal(sig)
    assert parent.wait(timeout=60) == 42
    assert out.read_text() == f"ended its work on signal {int(sig)}"


def test_children_that_ignore_ctrl_c_are_signalled_then_killed(tmp_path):
    """A child that did not get the Ctrl-C (or ignores it) is sent SIGINT after the grace
    time, and killed once the timeout has passed."""
    wait = (
        "import pathlib, signal, sys, time; {}; pathlib.Path(sys.argv[1]).touch(); time.sleep(60)"
    )
    stubborn = children.popen(
        [
            sys.executable,
            "-c",
            wait.format("signal.signal(signal.SIGINT, signal.SIG_IGN)"),
            str(tmp_path / "a"),
        ]
    )
    polite = children.popen([sys.executable, "-c", wait.format("pass"), str(tmp_path / "b")])
    deadline = time.monotonic() + 60
    while not ((tmp_path / "a").exists() and (tmp_path / "b").exists()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    killed = procs.stop_children([stubborn, polite], grace=0.2, timeout=5.0)
    assert killed == [stubborn]
    assert polite.returncode == -signal.SIGINT  # Python's exit on an unhandled Ctrl-C
    assert stubborn.returncode == -signal.SIGKILL


STUBBORN_PARENT = """
import sys
from sweeps import procs
procs.STOP_TIMEOUT = 0.5
try:
    procs.run_child([sys.executable, "-c", sys.argv[1], sys.argv[2]])
except KeyboardInterrupt as e:
    print(procs.child_killed(e), *getattr(e, "__notes__", []), sep="\\n")
"""
WAITING_CHILD = """
import pathlib, signal, sys, time
if {stubborn}:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
pathlib.Path(sys.argv[1]).touch()
time.sleep(60)
"""


@pytest.mark.parametrize("stubborn", [True, False], ids=["killed", "stopped"])
def test_an_interrupt_says_when_the_child_had_to_be_killed(tmp_path, stubborn):
    """A child that ignores the Ctrl-C past the timeout is killed, and the interrupt that goes
    on says so (its work, a run, was not ended); one that stops in time is not."""
    started = tmp_path / "started"
    parent = children.popen(
        [sys.executable, "-c", STUBBORN_PARENT, WAITING_CHILD.format(stubborn=stubborn), started],
        preexec_fn=_default_sigint,
        stdout=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not started.exists():
        assert parent.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(parent.pid, signal.SIGINT)
    out, _ = parent.communicate(timeout=60)
    lines = out.splitlines()
    if stubborn:
        assert lines[0] == "True"
        assert lines[1].startswith(procs.KILLED)
        assert "did not stop within 0.5 s of the signal and was killed" in out
    else:
        assert lines == ["False"]
