"""Ray Serve benchmark: the Ray path vs the direct server on one machine, and persona routing over 2 replicas.

    nice -n 5 .venv/bin/python bench/ray_bench.py [--quick] [--write]

1. Throughput and TTFT, side by side in one run: `reft-serve serve` (API process + engine process) and
   `reft-serve serve --ray --replicas 1` (ingress + one engine replica holding all the machine's CPUs), both up at
   once, driven in interleaved rounds (so slow drifts of this shared machine hit both alike) with streaming chat
   requests over HTTP, every request a different persona, greedy, exactly `--tokens` tokens each. The median round
   of each is reported; the idle TTFT (one request at a time, alternating paths) shows the per-request overhead.
2. Routing: `--ray --replicas 2` (one CPU each) under a Zipf-distributed persona mix at `--routing-concurrency`;
   the hit rate (requests that found their persona already loaded on the replica that served them) is read from
   the ingress's per-replica metrics, next to what routing that ignores personas would get for the same sequence.

SmolLM2-135M fp32 on CPU. Prints markdown; `--write` replaces the "## Ray Serve" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import ray
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import reft_serve, write_section  # noqa: E402
from bench.serve_bench import PROMPTS, load, one_request, pct, random_persona, summarize  # noqa: E402
from reft_core.artifact import encode_artifact  # noqa: E402
from reft_core.base_model import BaseModel, load_base_model  # noqa: E402

SECTION = "## Ray Serve"


@contextmanager
def ray_serve(data_dir: Path, replicas: int, replica_cpus: float) -> Iterator[str]:
    """`reft-serve serve --ray` on its own local cluster (its own short RAY_TMPDIR: socket paths must fit 107
    bytes, and a test's cluster on this machine must not be joined); SIGTERM removes the cluster afterwards."""
    ray_dir = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    env = os.environ | {"RAY_TMPDIR": ray_dir}
    env.pop("RAY_ADDRESS", None)
    with reft_serve(data_dir, "--ray", "--replicas", str(replicas), "--replica-cpus", str(replica_cpus),
                    env=env) as (_, url):
        yield url


def upload_personas(url: str, base: BaseModel, count: int) -> list[str]:
    names = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(count):
            payload, _ = encode_artifact(random_persona(base.hidden_size, i), base.fingerprint)
            response = client.post("/v1/interventions", data={"name": f"p{i}"},
                                   files={"file": ("p.safetensors", payload)})
            assert response.status_code == 201, response.text
            names.append(f"p{i}")
    return names


def idle_ttft(urls: dict[str, str], model: str, repeats: int) -> dict[str, float]:
    """Median time to the first streamed token of one request at a time, alternating the paths."""
    times: dict[str, list[float]] = {label: [] for label in urls}

    async def run() -> None:
        clients = {label: httpx.AsyncClient(base_url=url, timeout=120) for label, url in urls.items()}
        try:
            for _ in range(repeats):
                for label, client in clients.items():
                    result = await one_request(client, model, PROMPTS[0], 4)
                    assert result.ok, label
                    times[label].append(result.ttft)
        finally:
            for client in clients.values():
                await client.aclose()

    asyncio.run(run())
    return {label: statistics.median(values) for label, values in times.items()}


def side_by_side(urls: dict[str, str], names: list[str], concurrency: list[int], tokens: int, rounds: int
                 ) -> list[dict]:
    rows = []
    for size in concurrency:
        models = [names[i % len(names)] for i in range(size)]
        runs: dict[str, list[dict]] = {label: [] for label in urls}
        for _ in range(rounds):
            for label, url in urls.items():
                results, wall = asyncio.run(load(url, models, tokens))
                runs[label].append(summarize(f"{label}, {size} concurrent", results, wall))
        for label in urls:
            ordered = sorted(runs[label], key=lambda r: r["tok_s"])
            chosen = dict(ordered[len(ordered) // 2])
            chosen["failed"] = sum(r["failed"] for r in runs[label])
            chosen["size"], chosen["path"] = size, label
            rows.append(chosen)
            print(chosen, flush=True)
    return rows


def replica_counters(url: str) -> dict[str, dict[str, float]]:
    """metric -> {replica: value} for the ingress's per-replica series."""
    found: dict[str, dict[str, float]] = {"reft_ray_replica_requests_total": {},
                                          "reft_ray_replica_intervention_loads": {}}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("reft_ray_replica_") and "{" in line:
            name, rest = line.split("{", 1)
            if name in found:  # (not the counter's `_created` series)
                replica = rest.split('replica="', 1)[1].split('"', 1)[0]
                found[name][replica] = float(line.rsplit(" ", 1)[1])
    return found


def zipf_sequence(names: list[str], count: int, exponent: float, seed: int) -> list[str]:
    weights = [1 / (rank + 1) ** exponent for rank in range(len(names))]
    return random.Random(seed).choices(names, weights=weights, k=count)


def persona_blind_hit_rate(sequence: list[str], replicas: int, seed: int, trials: int = 200) -> float:
    """Expected hit rate when each request goes to a uniformly random replica (no affinity, no eviction)."""
    rng, hits = random.Random(seed), 0
    for _ in range(trials):
        loaded: set[tuple[str, int]] = set()
        for name in sequence:
            key = (name, rng.randrange(replicas))
            hits += key in loaded
            loaded.add(key)
    return hits / (trials * len(sequence))


def routing(url: str, sequence: list[str], concurrency: int, tokens: int) -> dict:
    before = replica_counters(url)

    async def run() -> list:
        gate = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=600,
                                     limits=httpx.Limits(max_connections=concurrency + 4)) as client:
            async def one(i: int, model: str):
                async with gate:
                    return await one_request(client, model, PROMPTS[i % len(PROMPTS)], tokens)
            return await asyncio.gather(*(one(i, m) for i, m in enumerate(sequence)))

    started = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - started
    after = replica_counters(url)
    delta = {name: {r: v - before[name].get(r, 0) for r, v in after[name].items()} for name in after}
    served = delta["reft_ray_replica_requests_total"]
    loads = sum(delta["reft_ray_replica_intervention_loads"].values())
    return {"requests": len(sequence), "failed": sum(not r.ok for r in results), "served": sum(served.values()),
            "split": sorted(served.values(), reverse=True), "loads": loads,
            "hit_rate": 1 - loads / max(1, sum(served.values())), "distinct": len(set(sequence)),
            "tok_s": sum(r.tokens for r in results if r.ok) / wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per concurrency (median)")
    parser.add_argument("--personas", type=int, default=32)
    parser.add_argument("--routing-requests", type=int, default=256)
    parser.add_argument("--routing-concurrency", type=int, default=16)
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the persona mix")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--skip-routing", action="store_true")
    parser.add_argument("--write", action="store_true", help="replace the Ray Serve section of BENCHMARKS.md")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.concurrency, args.rounds, args.routing_requests = 8, [8], 1, 32
    cpus = os.cpu_count() or 2
    base = load_base_model(device="cpu", dtype="float32")  # for the personas' fingerprint and hidden size
    work = Path(tempfile.mkdtemp(prefix="reft-ray-bench-"))

    with reft_serve(work / "direct") as (_, direct), ray_serve(work / "ray1", 1, cpus) as ray1:
        urls = {"direct server": direct, "Ray, 1 replica": ray1}
        names = {label: upload_personas(url, base, args.personas) for label, url in urls.items()}[
            "direct server"]
        for url in urls.values():  # warm-up: every persona decoded and resident on both paths
            asyncio.run(load(url, names, 1))
        ttft = idle_ttft(urls, names[0], 3 if args.quick else 15)
        print(ttft, flush=True)
        rows = side_by_side(urls, names, args.concurrency, args.tokens, args.rounds)

    route = None
    if not args.skip_routing:
        with ray_serve(work / "ray2", 2, cpus / 2) as ray2:
            names = upload_personas(ray2, base, args.personas)
            sequence = zipf_sequence(names, args.routing_requests, args.zipf, seed=7)
            route = routing(ray2, sequence, args.routing_concurrency, 16)
            route["blind"] = persona_blind_hit_rate(sequence, 2, seed=7)
            route["ideal"] = 1 - route["distinct"] / len(sequence)
            print(route, flush=True)
    report = render(args, cpus, rows, ttft, route)
    print(report)
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", SECTION, report)


def render(args: argparse.Namespace, cpus: int, rows: list[dict], ttft: dict[str, float], route: dict | None
           ) -> str:
    by = {(r["path"], r["size"]): r for r in rows}
    table = ["| path | concurrent | requests | failed | tok/s | TTFT p50 (s) | TTFT p99 (s) |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {r['path']} | {r['size']} | {r['requests']} | {r['failed']} | {r['tok_s']:.1f} | "
              f"{r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} |" for r in rows]
    ratios = ["| comparison | value |", "|---|---|"]
    for size in args.concurrency:
        direct, on_ray = by[("direct server", size)], by[("Ray, 1 replica", size)]
        ratios.append(f"| {size} concurrent: Ray throughput / direct (goal >= 0.9) | "
                      f"{on_ray['tok_s'] / direct['tok_s']:.2f} |")
        ratios.append(f"| {size} concurrent: TTFT p50 overhead, Ray - direct (s) | "
                      f"{on_ray['ttft_p50'] - direct['ttft_p50']:+.2f} |")
    ratios.append(f"| idle TTFT (one request at a time, median), Ray vs direct (s) | "
                  f"{ttft['Ray, 1 replica']:.3f} vs {ttft['direct server']:.3f} "
                  f"({ttft['Ray, 1 replica'] - ttft['direct server']:+.3f}) |")
    wrap = lambda text: textwrap.fill(text, 118, break_on_hyphens=False)  # noqa: E731 - paragraphs as the rest of BENCHMARKS.md
    lines = [
        SECTION, "",
        wrap(f"`nice -n 5 .venv/bin/python bench/ray_bench.py{' --quick' if args.quick else ''} --write` (niced: other "
        "benchmarks may share this machine; both paths ran under the same nice level, side by side). "
        f"SmolLM2-135M-Instruct fp32 on CPU; {cpus} CPU cores, no GPU; Python {platform.python_version()}, torch "
        f"{torch.__version__}, ray {ray.__version__}. Streaming chat over HTTP, greedy, exactly {args.tokens} "
        f"tokens per request, each request a different one of {args.personas} random personas. The direct server "
        "(`reft-serve serve`: API process + engine process) and `reft-serve serve --ray --replicas 1 "
        f"--replica-cpus {cpus}` (ingress + one engine replica) ran at the same time and were driven in "
        f"{args.rounds} interleaved rounds; each row is the median round."), "",
        *table, "", *ratios, "",
    ]
    if route is not None:
        lines += [
            wrap(f"Routing over `--ray --replicas 2 --replica-cpus {cpus / 2:g}`: {route['requests']} requests "
            f"({args.routing_concurrency} at a time, 16 tokens) drawn from {args.personas} personas with Zipf "
            f"exponent {args.zipf} ({route['distinct']} distinct drawn). A hit is a request whose persona was "
            "already loaded on the replica that served it (1 - loads / requests, from the ingress's "
            "`reft_ray_replica_requests_total` and `reft_ray_replica_intervention_loads`)."), "",
            "| routing | value |", "|---|---|",
            f"| requests served / failed | {route['served']:.0f} / {route['failed']} |",
            f"| requests per replica | {' / '.join(f'{v:.0f}' for v in route['split'])} |",
            f"| persona loads (both replicas) | {route['loads']:.0f} |",
            f"| hit rate, Ray's persona-aware routing | {route['hit_rate']:.3f} |",
            f"| hit rate, persona-blind routing (uniform random replica, same sequence, expected) | "
            f"{route['blind']:.3f} |",
            f"| hit rate, ideal (each persona loaded once in the cluster) | {route['ideal']:.3f} |",
            f"| throughput (tok/s) | {route['tok_s']:.1f} |", "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
