"""A PostgreSQL server of a test's own (initdb into a temp dir, a free port, trust auth), so a test can stop and
restart it; the shared server on 5432 is never touched.

Binaries come from /usr/lib/postgresql/<version>/bin (Debian's `postgresql` package, which the test machines have
for the shared server), or $REFT_TEST_PG_BIN. PostgreSQL refuses to run as root, so when the tests run as root
(CI does) the cluster belongs to the `postgres` user and every command runs through `runuser -u postgres`.
Where no binaries are found the caller skips, unless `required()` (CI, or REFT_REQUIRE_PRIVATE_POSTGRES=1: .ci/run
sets it), where it fails instead.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg

RUN_AS = "postgres"  # the account that owns the cluster when the tests run as root


def required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("REFT_REQUIRE_PRIVATE_POSTGRES") == "1"


def find_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (None: not installed)."""
    configured = os.environ.get("REFT_TEST_PG_BIN")
    if configured:
        return Path(configured)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


class PrivatePostgres:
    """initdb + pg_ctl on a free loopback port; `stop()` (immediate: as a crash would) and `start()` at will."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="reft-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_root = os.geteuid() == 0
        if self._as_root:  # the cluster's files must belong to the account the server runs as
            account = pwd.getpwnam(RUN_AS)
            os.chown(self.root, account.pw_uid, account.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self._as_root:
            command = ["runuser", "-u", RUN_AS, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{' '.join(command)} failed: {done.stdout}{done.stderr}{self._log_tail()}"

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def start(self) -> None:
        # sockets in our own directory (the default one may not be writable); fsync off: only the process stops
        # here, never the machine, so committed data survives in the page cache exactly as it would on disk
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
                   "-c max_connections=100")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "immediate") -> None:
        """`immediate`: every backend killed without a checkpoint; the next start recovers from the WAL."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def destroy(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
