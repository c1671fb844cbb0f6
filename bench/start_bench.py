"""How long `reft-serve serve` takes from its command to a 200 on /ready (embedded SmolLM2, empty registry), with
the engine process launched before the API process's heavy imports (the default) and after them (as before:
`server.cli.launch` replaced by a no-op, so `start_engine` launches it once the app is built). Rounds alternate
the two; medians and the ratio, side by side.

    .venv/bin/python bench/start_bench.py [--rounds 5] [--write]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import free_port, write_section  # noqa: E402

HEADER = "## Start"
LATE = ("import sys, server.cli as cli; cli.launch = lambda spec: None; "  # start_engine then launches it itself
        "raise SystemExit(cli.main(sys.argv[1:]))")
EARLY = "import sys, server.cli as cli; raise SystemExit(cli.main(sys.argv[1:]))"
MODES = {"engine process launched first (default)": EARLY, "engine process launched after the app is built": LATE}


def time_to_ready(program: str) -> float:
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        started = time.perf_counter()
        server = subprocess.Popen([sys.executable, "-c", program, "--log-level", "warning", "serve", "--port",
                                   str(port), "--data-dir", data_dir], cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                        return time.perf_counter() - started
                except httpx.HTTPError:
                    pass
                if server.poll() is not None:
                    raise RuntimeError("the server exited before it was ready")
                time.sleep(0.05)
        finally:
            server.terminate()
            server.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="replace the start section of BENCHMARKS.md")
    args = parser.parse_args()
    time_to_ready(EARLY)  # warm the page cache and the model conversion, so no mode pays them
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode, program in MODES.items():
            times[mode].append(time_to_ready(program))
            print(f"{mode}: {times[mode][-1]:.2f} s", flush=True)
    early, late = (statistics.median(t) for t in times.values())
    lines = [HEADER, "", f"`bench/start_bench.py --rounds {args.rounds}` ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
             f"Python {platform.python_version()}, {platform.machine()}): `reft-serve serve` on the embedded "
             "SmolLM2 with an empty SQLite registry, from the command to a 200 on /ready. Rounds alternate the "
             "modes; medians.", "", "| mode | seconds to /ready (median) | every round |", "|---|---|---|"]
    for mode, values in times.items():
        lines.append(f"| {mode} | {statistics.median(values):.2f} | {', '.join(f'{v:.1f}' for v in values)} |")
    lines += ["", f"Launched first / launched after: **{early / late:.2f}x** the time to /ready.", ""]
    section = "\n".join(lines)
    print(section)
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", HEADER, section)


if __name__ == "__main__":
    main()
