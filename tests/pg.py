"""A throwaway PostgreSQL server on loopback for tests.

Uses the server binaries of Debian's ``postgresql`` package (/usr/lib/postgresql/<v>/bin).
PostgreSQL refuses to run as root, so as root every server command runs as the ``postgres``
OS user (``runuser -u postgres --``) in a temporary directory that user owns.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

# util-linux's runuser lives in sbin, which a non-login root shell may not have on PATH
RUNUSER = shutil.which("runuser") or next(
    (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.path.exists(p)), "runuser"
)


def find_bindir() -> Path | None:
    """The newest installed PostgreSQL server bin dir, or None."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """initdb + pg_ctl start on 127.0.0.1:<free port>; ``url`` once started; ``stop()``."""

    def __init__(self, bindir: Path, database: str = "optuna") -> None:
        self.bindir = bindir
        self.database = database
        self.root = Path(tempfile.mkdtemp(prefix="sweeps-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = [RUNUSER, "-u", "postgres", "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if out.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
            )
        return out

    def start(self) -> str:
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        os.chmod(self.root, 0o755)
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "-N"
        )
        self.resume()
        self._run(
            "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", self.database
        )
        return self.url

    def halt(self) -> None:
        """Stop the server (its clients' connections end), keeping its data for ``resume``."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """Start the server on its data and port."""
        options = f"-p {self.port} -k {self.root} -h 127.0.0.1 -c fsync=off -c max_connections=100"
        try:
            self._run(
                "pg_ctl",
                "-D",
                str(self.data),
                "-o",
                options,
                "-l",
                str(self.root / "server.log"),
                "-w",
                "start",
            )
        except RuntimeError as e:
            log = self.root / "server.log"
            raise RuntimeError(
                f"{e}\nserver log:\n{log.read_text() if log.exists() else '(none)'}"
            ) from None

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
