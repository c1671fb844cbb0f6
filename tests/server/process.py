"""A real `reft-serve` process on loopback serving a tiny model directory, for tests that kill or signal it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def server_process(
    model_dir: Path | None, data_dir: Path, *extra: str, ready_timeout: float = 60,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[tuple[subprocess.Popen, str]]:
    """`reft-serve serve` for `model_dir` (None: the embedded model) until the block ends (then SIGKILL if alive).
    `preexec_fn` runs in the child before it starts (e.g. to lower its resource limits)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model = ["--model", str(model_dir)] if model_dir is not None else []
    command = [sys.executable, "-m", "server.cli", "--log-level", "warning", "serve", *model,
               "--data-dir", str(data_dir), "--port", str(port), *extra]
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"server-{port}.log"  # a file, not a pipe nobody drains (it could fill and block)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
                                   preexec_fn=preexec_fn)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + ready_timeout
        while True:
            assert process.poll() is None, log_path.read_text(errors="replace")[-2000:]
            assert time.time() < deadline, "server did not become ready"
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (children are listed per thread: the engine process is started off the main one)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                pending.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:
                continue  # the thread or process just ended
    return found


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a server process and its engine process (and any other child), together."""
    total = 0
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total
