"""Which process, on which machine: to tell whether the process that left a record (a
trial, a run) is still alive; and child processes stopped the way they end their own work."""

from __future__ import annotations

import functools
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def hostname() -> str:
    return socket.gethostname()


def process_start(pid: int) -> str:
    """The start time of a process (clock ticks since boot, Linux), to tell a reused pid
    from the original process; empty when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_alive(pid: int, started: str = "") -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if started:
        now = process_start(pid)
        if now and now != started:
            return False  # the pid was reused by another process
    return True


@functools.cache
def pid_space() -> str:
    """This boot of this kernel and this process's pid namespace: where a pid names one
    process. Two machines, or one before and after a reboot, differ in their boot id;
    containers on one kernel share it but not their pid namespace. Empty when unknown."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ns = os.readlink("/proc/self/ns/pid")  # pid:[4026531836]
    except OSError:
        return ""
    return f"{boot}/{ns.removeprefix('pid:[').removesuffix(']')}"


def process_id(pid: int | None = None) -> str:
    """``<boot id>/<pid namespace>/<pid>/<start time>``: a process, unambiguous across
    machines, reboots, containers and reused pids; empty where /proc does not tell."""
    pid = os.getpid() if pid is None else pid
    space, start = pid_space(), process_start(pid)
    return f"{space}/{pid}/{start}" if space and start else ""


def dead_here(ident: str) -> bool:
    """True only when ``ident`` (``process_id``) names a process in this machine's current
    boot and this pid namespace that is no longer running. Anything else (another machine,
    an earlier boot, another container, an unreadable id) is not known to be dead."""
    space = pid_space()
    if not space or not ident.startswith(space + "/"):
        return False
    pid, _, start = ident.removeprefix(space + "/").partition("/")
    if not (pid.isdigit() and start):
        return False
    return not process_alive(int(pid), start)


@functools.cache
def machine_id() -> str:
    """This installation's machine id (systemd's /etc/machine-id: the same across reboots,
    its own on each machine); empty when there is none (many containers)."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            return Path(path).read_text().strip()
        except OSError:
            continue
    return ""


def gone(
    ident: str, host: str, pid: int, start: str = "", machine: str = "", *, certain: bool = False
) -> bool:
    """Whether the process a record names is known to be gone, by what the record kept: its
    ``ident`` (``process_id``; empty in records of older versions, or where /proc did not
    tell), the name of its ``host``, its ``pid``, start time and ``machine`` id.

    A process of this boot and pid namespace: by its pid and start (``dead_here``). One of
    another boot, where both machine ids are known: gone when it ran on this machine (same
    host name and machine id: a reboot ended it); a machine that merely shares the host name
    is not judged. Otherwise (another pid namespace of this boot, most often this container
    before a restart; a boot of a machine without a machine id, as in many containers; a
    record without an ident), as records always were: a process of this host name whose pid
    is free or reused here. That judges a restarted container's old workers gone, and would
    judge wrongly a worker of a sibling container that shares this host name (host
    networking) and has a pid that is free here: give such containers their own host
    names. ``certain``: only the first two cases; in the others, not known to be gone."""
    space = pid_space()
    if ident and space:
        boot, here = ident.split("/", 1)[0], space.split("/", 1)[0]
        if boot == here and ident.startswith(space + "/"):
            return dead_here(ident)
        if boot != here and machine and machine_id():
            return machine == machine_id() and host == hostname()
    if certain:
        return False
    return host == hostname() and not process_alive(pid, start)


def is_this_process(ident: str, host: str, pid: int) -> bool:
    """Whether a record names this process: by ``ident`` where both have one (two
    containers sharing a host name can both run a pid 1), else by host name and pid."""
    mine = process_id()
    if ident and mine:
        return ident == mine
    return host == hostname() and pid == os.getpid()


def stop_children(
    children: Sequence[subprocess.Popen],
    sig: int = signal.SIGINT,
    grace: float = 5.0,
    timeout: float = 60.0,
) -> list[subprocess.Popen]:
    """Stop this process's children after it was interrupted, letting each end its own work
    (``sweeps.run`` ends its run KILLED, a search fails its running trials): with SIGINT,
    which a terminal's Ctrl-C sends to the children too, they first get ``grace`` seconds
    to stop by themselves; those still running then get ``sig``, and any still running
    ``timeout`` seconds later is killed. Returns the killed ones: their work was not ended
    (a run they had open stays RUNNING until a later command finds their process gone)."""
    if sig == signal.SIGINT:
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.poll() is None for p in children):
            time.sleep(0.1)
    for p in children:
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.monotonic() + timeout
    killed = []
    for p in children:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            killed.append(p)
    return killed


STOP_TIMEOUT = 60.0  # seconds run_child's child has to stop after the signal, then SIGKILL
KILLED = "killed:"  # how the note that run_child adds to its interrupt begins


def run_child(cmd: Sequence[str], **popen_kwargs) -> int:
    """``subprocess.run(cmd).returncode`` for a command that ends its own work on Ctrl-C or
    SIGTERM. ``subprocess.run`` kills its child 0.25 s after a Ctrl-C, which can cut that
    ending short and leave a run or a study RUNNING; here the child is stopped with
    ``stop_children`` (SIGTERM passed on when the interrupt is ``tracking.Terminated``),
    and then the interrupt goes on; if the child had to be killed, with a note saying so
    (``child_killed``)."""
    proc = subprocess.Popen(list(cmd), **popen_kwargs)
    try:
        return proc.wait()
    except KeyboardInterrupt as e:
        if stop_children([proc], getattr(e, "signum", signal.SIGINT), timeout=STOP_TIMEOUT):
            e.add_note(
                f"{KILLED} {shlex.join(cmd)} did not stop within {STOP_TIMEOUT:g} s of the "
                "signal and was killed: what it had open (a run, a trial) is left RUNNING"
            )
        raise


def child_killed(e: BaseException) -> bool:
    """Whether ``run_child`` had to kill its child before passing on the interrupt ``e``."""
    return any(note.startswith(KILLED) for note in getattr(e, "__notes__", ()))
