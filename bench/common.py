"""What the benchmark scripts share: a `reft-serve` process on loopback, and their sections of BENCHMARKS.md."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def reft_serve(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """`reft-serve serve ARGS` on a free loopback port, logging to `data_dir/server.log`; yields once /ready is 200
    and stops it with SIGTERM (a graceful drain) afterwards."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "server.log").open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "--log-level", "warning", "serve", "--port", str(port),
             "--data-dir", str(data_dir), *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the server did not start: {(data_dir / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield server, url
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


def write_section(path: Path, header: str, section: str) -> None:
    """Replace the `header` section of a markdown file (up to the next `## `), or append it."""
    text = path.read_text() if path.exists() else ""
    if header in text:
        head, _, rest = text.partition(header)
        tail = rest[rest.index("\n## "):] if "\n## " in rest else ""
        text = head + section.rstrip("\n") + "\n" + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
