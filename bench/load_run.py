"""Bounded load run: a real `reft-serve` process (SmolLM2-135M, auth on) under mixed load for a fixed time.

    .venv/bin/python bench/load_run.py [--seconds 60] [--clients 64] [--write]

For `--seconds`: `--clients` closed-loop streaming chat clients over two tenants' personas (each tenant uses its
own interventions and the other's public one), one uploader replacing and adding interventions, one training
job, and one deliberately throttled tenant (10 requests/min) polling so that 429s are expected from it only.
The server's resident memory is sampled every 2 s. Pass criteria, checked and printed: zero 5xx, zero errors
inside streams, 429s only for the throttled tenant, and after a 20 s warm-up (KV cache, bank tables and allocator
pools fill up) the memory peak of the second half within 5% of the first half's.
With `--write`, replaces the "## Load run" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import reft_serve, write_section  # noqa: E402
from bench.serve_bench import PROMPTS, random_persona  # noqa: E402
from reft_core.artifact import encode_artifact  # noqa: E402
from reft_core.base_model import load_base_model  # noqa: E402

SECTION = "## Load run"
WARMUP_S = 20.0
ADMIN_KEY = "load-run-admin-key"
DATA = ROOT.parent / "shared" / "data" / "emoji_bot.jsonl"


class Tally:
    """Response counts by (who, status class); errors seen inside streams."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.stream_errors: list[str] = []
        self.tokens = 0
        self.lock = threading.Lock()

    def add(self, who: str, status: int | str) -> None:
        with self.lock:
            self.counts[(who, str(status))] += 1


def rss_mib(pid: int) -> float:
    """The server's resident memory with its engine process (psutil ships with accelerate, a core dependency)."""
    import psutil

    try:
        server = psutil.Process(pid)
        members = [server, *server.children(recursive=True)]
        return sum(p.memory_info().rss for p in members) / (1 << 20)
    except psutil.Error:
        return float("nan")


def setup(url: str, fingerprint, hidden: int) -> dict[str, object]:  # noqa: ANN001
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    keys: dict[str, str] = {}
    with httpx.Client(base_url=url, timeout=60) as client:
        for tenant, limits in (("acme", {}), ("globex", {}), ("throttled", {"requests_per_minute": 10})):
            assert client.post("/v1/admin/tenants", json={"name": tenant, "limits": limits}, headers=admin).status_code == 201
            keys[tenant] = client.post(f"/v1/admin/tenants/{tenant}/keys", headers=admin).json()["key"]
        personas: dict[str, list[str]] = {"acme": [], "globex": []}
        for t_index, tenant in enumerate(("acme", "globex")):
            for i in range(8):
                payload, _ = encode_artifact(random_persona(hidden, 100 * t_index + i), fingerprint)
                name = f"persona-{i}"
                response = client.post("/v1/interventions", data={"name": name}, files={"file": ("a.safetensors", payload)},
                                       headers={"Authorization": f"Bearer {keys[tenant]}"})
                assert response.status_code == 201, response.text
                personas[tenant].append(name)
        assert client.put("/v1/admin/tenants/acme/interventions/persona-0/public", json={"public": True},
                          headers=admin).status_code == 200
    personas["globex"].append("acme/persona-0")
    return {"keys": keys, "personas": personas}


async def chat_client(url: str, key: str, tenant: str, models: list[str], stop: float, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers) as client:
        while time.monotonic() < stop:
            body = {"model": rng.choice(models), "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                    "max_tokens": rng.choice([16, 32, 48]), "temperature": 0.7, "stream": True,
                    "stream_options": {"include_usage": True}}
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    tally.add(tenant, response.status_code)
                    if response.status_code != 200:
                        await response.aread()
                        await asyncio.sleep(1.0)
                        continue
                    async for line in response.aiter_lines():
                        if line.startswith("data: {") and '"error"' in line:
                            tally.stream_errors.append(line[:200])
                        elif line.startswith("data: {") and '"usage"' in line:
                            usage = json.loads(line[6:]).get("usage")
                            if usage:
                                tally.tokens += usage["completion_tokens"]
            except httpx.HTTPError as exc:
                tally.add(tenant, f"connection error {type(exc).__name__}")


def background(url: str, keys: dict[str, str], fingerprint, hidden: int, stop: float, tally: Tally) -> list[threading.Thread]:  # noqa: ANN001
    def uploader() -> None:
        headers = {"Authorization": f"Bearer {keys['acme']}"}
        with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
            i = 0
            while time.monotonic() < stop:
                payload, _ = encode_artifact(random_persona(hidden, 5000 + i), fingerprint)
                files = {"file": ("a.safetensors", payload)}
                if i % 2:
                    response = client.put(f"/v1/interventions/persona-{i % 8}", files=files)
                else:
                    response = client.post("/v1/interventions", data={"name": f"extra-{i}"}, files=files)
                tally.add("uploader", response.status_code)
                i += 1
                time.sleep(1.0)

    def trainer() -> None:
        headers = {"Authorization": f"Bearer {keys['globex']}"}
        rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
        body = {"name": "emoji-load", "examples": rows, "hyperparameters": {"epochs": 1000}}
        with httpx.Client(base_url=url, timeout=60, headers=headers) as client:
            response = client.post("/v1/trainings", json=body)
            tally.add("trainer", response.status_code)
            job = response.json()["id"]
            while time.monotonic() < stop:
                time.sleep(2.0)
                tally.add("trainer", client.get(f"/v1/trainings/{job}").status_code)
            client.delete(f"/v1/trainings/{job}")

    def throttled() -> None:
        headers = {"Authorization": f"Bearer {keys['throttled']}"}
        with httpx.Client(base_url=url, timeout=60, headers=headers) as client:
            while time.monotonic() < stop:
                tally.add("throttled", client.get("/v1/models").status_code)
                time.sleep(0.5)

    threads = [threading.Thread(target=f, daemon=True) for f in (uploader, trainer, throttled)]
    for thread in threads:
        thread.start()
    return threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    base = load_base_model()  # converts/caches the embedded model once; the server then loads from the cache
    fingerprint, hidden = base.fingerprint, base.hidden_size
    del base
    with tempfile.TemporaryDirectory() as data_dir:
        env = {**os.environ, "REFT_SERVE_ADMIN_KEY": ADMIN_KEY}
        with reft_serve(Path(data_dir), "--auth", "on", env=env) as (server, url):
            world = setup(url, fingerprint, hidden)
            keys, personas = world["keys"], world["personas"]
            tally = Tally()
            memory: list[tuple[float, float]] = []
            started = time.monotonic()
            stop = started + args.seconds
            threads = background(url, keys, fingerprint, hidden, stop, tally)  # type: ignore[arg-type]

            def sample_memory() -> None:
                while time.monotonic() < stop:
                    memory.append((time.monotonic() - started, rss_mib(server.pid)))
                    time.sleep(2.0)

            sampler = threading.Thread(target=sample_memory, daemon=True)
            sampler.start()

            async def clients() -> None:
                await asyncio.gather(*(
                    chat_client(url, keys[t], t, personas[t], stop, tally, seed=i)  # type: ignore[index]
                    for i, t in enumerate(["acme", "globex"] * (args.clients // 2))
                ))

            asyncio.run(clients())
            for thread in [*threads, sampler]:
                thread.join(60)
            healthy = httpx.get(f"{url}/health", timeout=10).status_code == 200
    report(args, tally, memory, healthy)


def report(args: argparse.Namespace, tally: Tally, memory: list[tuple[float, float]], healthy: bool) -> None:
    by_who: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (who, status), count in sorted(tally.counts.items()):
        by_who[who][status] = count
    rows = ["| client | responses by status |", "|---|---|"]
    rows += [f"| {who} | {', '.join(f'{s}: {n}' for s, n in statuses.items())} |" for who, statuses in by_who.items()]
    server_errors = sum(n for (_, s), n in tally.counts.items() if s.isdigit() and int(s) >= 500)
    other = sum(n for (who, s), n in tally.counts.items() if not s.isdigit() or (s == "429" and who != "throttled")
                or (s.isdigit() and 400 <= int(s) < 500 and s != "429"))
    steady = [m for t, m in memory if t >= WARMUP_S]  # KV cache, bank tables and allocator pools fill up first
    half = len(steady) // 2
    first_peak = max(steady[:half]) if half else float("nan")
    second_peak = max(steady[half:]) if half else float("nan")
    growth = second_peak / first_peak - 1 if half else float("nan")
    ok = server_errors == 0 and not tally.stream_errors and other == 0 and healthy and growth <= 0.05
    versions = f"torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPU cores, no GPU"
    section = "\n".join([
        SECTION, "",
        f"`bench/load_run.py --seconds {args.seconds:g} --clients {args.clients}`: a `reft-serve` process (SmolLM2-135M",
        f"fp32, auth on) on loopback for {args.seconds:g} s: {args.clients} closed-loop streaming chat clients over two tenants",
        "(8 personas each plus one public persona of the other tenant; 16-48 tokens, temperature 0.7), an uploader",
        "adding or replacing an intervention every second, a training job on the emoji examples, and a tenant",
        f"throttled to 10 requests/min polling twice a second. {versions}.", "",
        *rows, "",
        f"- 5xx responses: {server_errors}; errors inside streams: {len(tally.stream_errors)}; other 4xx or "
        f"connection errors: {other}; server healthy after: {healthy}",
        f"- chat tokens streamed: {tally.tokens} ({tally.tokens / args.seconds:.1f} tok/s)",
        f"- server RSS (MiB): at start {memory[0][1]:.0f}; after a {WARMUP_S:g} s warm-up, first-half peak "
        f"{first_peak:.0f}, second-half peak {second_peak:.0f} ({growth:+.1%})" if memory else "- server RSS: not sampled",
        "- server RSS trace (s: MiB): " + ", ".join(f"{t:.0f}: {m:.0f}" for t, m in memory[::5]),
        f"- verdict: {'PASS' if ok else 'FAIL'} (zero 5xx, 429s only for the throttled tenant, memory within 5%)", "",
    ])
    print(section)
    if tally.stream_errors:
        print("stream errors:", *tally.stream_errors[:5], sep="\n")
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", SECTION, section)
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
