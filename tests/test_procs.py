"""Telling whether the process behind a record is gone: only for processes this machine can
see (its current boot, its pid namespace), and never a reused pid for the original."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

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
