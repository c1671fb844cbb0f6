"""Registry at scale: 1k / 10k / 100k personas on SQLite and on PostgreSQL, served by real `reft-serve` processes.

    nice -n 5 .venv/bin/python bench/registry_scale.py [--sizes 1000 10000 100000] [--backends sqlite postgres]
                                                       [--write]

For each backend and size the registry is built directly through the store's tables (a bulk path: one transaction,
tiny random artifacts, every name distinct bytes, all in the tenant `default`, the worst case for per-tenant
queries), then a `reft-serve serve` process on the tiny test model (tests/tiny.py, saved to a directory) is timed:
  - start: process launch to the first 200 from /ready;
  - lookup: `GET /v1/interventions/{name}` of random existing names (a store read through the registry, as every
    request on a name it has not cached does), and a chat request with max_tokens=1 on random names (resolve,
    decode, one forward) - p50/p99 from the client;
  - uploads/s: new names through `POST /v1/interventions` from 4 client threads, and their p99;
  - RSS of the server's processes (API + engine) after the lookups, minus the same over an empty registry.
Then 3 replicas vs 1 on the largest PostgreSQL registry, and SQLite (1 replica): requests/s and p99 of lookups and
uploads from 8 client threads spread round-robin over the replicas. Prints markdown; `--write` puts the tables in
BENCHMARKS.md's "Registry at scale" section (the reading under it is written by hand).
PostgreSQL: a database of our own on $REFT_TEST_POSTGRES (default the local trust-auth server), dropped at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters_store import ArtifactStore, StorageQuota  # noqa: E402
from adapters_store import usage as usage_counters  # noqa: E402
from adapters_store.index import to_row  # noqa: E402
from adapters_store.records import InterventionRecord  # noqa: E402
from bench.common import write_section  # noqa: E402
from reft_core.artifact import decode_artifact, encode_artifact  # noqa: E402
from reft_core.config import InterventionConfig  # noqa: E402
from reft_core.fingerprint import ModelFingerprint, fingerprint_model  # noqa: E402
from reft_core.intervention import Intervention, UnitWeights  # noqa: E402
from tests import tiny  # noqa: E402
from tests.server.process import server_process, tree_rss_bytes  # noqa: E402

CONFIG = InterventionConfig(layers=(1,), rank=1, positions="l1")
PREFIX = "p"  # names p0000000 ...: sorted order == build order
LIMITS = ["--set", "max_interventions_per_tenant=1000000", "--set", "max_bytes_per_tenant=100000000000"]
SECTION = "## Registry at scale"


def artifact(fingerprint: ModelFingerprint, seed: int) -> bytes:
    """A valid rank-1 artifact for the tiny model, distinct bytes per seed (about 1 KB)."""
    generator = torch.Generator().manual_seed(seed)
    r = torch.nn.functional.normalize(torch.randn(1, tiny.HIDDEN, generator=generator), dim=1)
    units = {unit: UnitWeights(R=r, W=0.1 * torch.randn(1, tiny.HIDDEN, generator=generator),
                               b=torch.randn(1, generator=generator)) for unit in CONFIG.units()}
    return encode_artifact(Intervention(CONFIG, tiny.HIDDEN, units), fingerprint)[0]


def records(fingerprint: ModelFingerprint, count: int) -> Iterator[tuple[InterventionRecord, bytes]]:
    """`count` (record, bytes) pairs named p0000000..., each its own random artifact (~0.3 ms each)."""
    created = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    for i in range(count):
        payload = artifact(fingerprint, i)
        decoded = decode_artifact(payload)
        yield InterventionRecord(
            name=f"{PREFIX}{i:07d}", version=1, tenant="default", digest=decoded.digest,
            file_sha256=hashlib.sha256(payload).hexdigest(), size_bytes=len(payload),
            base_model_id=fingerprint.id, config=CONFIG.to_dict(), created_at=created, source="upload",
            description="", tags=(), training={},
        ), payload


def build_sqlite(root: Path, fingerprint: ModelFingerprint, count: int) -> None:
    """The store's own schema (opened once through ArtifactStore), then files and rows in bulk. `root` is what
    `--store sqlite://DIR` opens: DIR/store."""
    store = ArtifactStore(root, fingerprint)
    store.close()
    import sqlite3

    db = sqlite3.connect(root / "index.sqlite3", isolation_level=None)
    db.execute("BEGIN")
    columns = "name, version, tenant, digest, file_sha256, size_bytes, base_model_id, config, created_at, " \
              "source, description, tags, training"
    for record, payload in records(fingerprint, count):
        path = root / "artifacts" / record.file_sha256[:2] / f"{record.file_sha256}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        db.execute(f"INSERT INTO versions ({columns}) VALUES ({', '.join('?' * 13)})", to_row(record))
        db.execute("INSERT INTO current (tenant, name, version, latest) VALUES (?, ?, 1, 1)",
                   (record.tenant, record.name))
    db.execute("COMMIT")
    db.close()


def build_postgres(url: str, fingerprint: ModelFingerprint, count: int) -> None:
    import psycopg

    ArtifactStore(url, fingerprint).close()  # the schema, migrated as a server would
    columns = "name, version, tenant, digest, file_sha256, size_bytes, base_model_id, config, created_at, " \
              "source, description, tags, training"
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        # the usage counters' row triggers would update one tenant's row 100k times in this one transaction (each
        # update walks the row's chain of versions: quadratic); off for the load, then filled from the tables as
        # the migration that adds them does
        for table in ("current", "versions"):
            cur.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")  # type: ignore[arg-type]
        with cur.copy("COPY blobs (file_sha256, payload) FROM STDIN") as blobs:
            rows = list(records(fingerprint, count))
            for record, payload in rows:
                blobs.write_row((record.file_sha256, payload))
        with cur.copy(f"COPY versions ({columns}) FROM STDIN") as versions:
            for record, _ in rows:
                versions.write_row(to_row(record))
        with cur.copy("COPY current (tenant, name, version, latest) FROM STDIN") as current:
            for record, _ in rows:
                current.write_row((record.tenant, record.name, 1, 1))
        for table in ("current", "versions"):
            cur.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")  # type: ignore[arg-type]
        cur.execute("DELETE FROM tenant_usage")
        cur.execute(usage_counters.FILL)  # type: ignore[arg-type]
        cur.execute("ANALYZE")
    # a store's own writes keep its planner statistics fresh through autovacuum; a bulk load is analysed by hand


@contextmanager
def postgres_database() -> Iterator[str]:
    import psycopg

    admin = os.environ.get("REFT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"reft_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    try:
        yield admin.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def quantiles(samples: list[float]) -> tuple[float, float]:
    """(p50, p99) in ms."""
    ordered = sorted(samples)
    return (1000 * statistics.median(ordered), 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))])


def timed(call: Callable[[], httpx.Response], expect: int) -> float:
    started = time.perf_counter()
    response = call()
    elapsed = time.perf_counter() - started
    assert response.status_code == expect, (response.status_code, response.text[:300])
    return elapsed


def spread(urls: list[str], work: list[Callable[[httpx.Client, str], float]], threads: int) -> tuple[float, list[float]]:
    """Run `work` items on `threads` client threads, item i against urls[i % len]; (wall seconds, latencies)."""
    clients = [httpx.Client(timeout=60) for _ in range(threads)]
    local = threading.local()
    counter = iter(range(len(clients)))
    lock = threading.Lock()

    def client() -> httpx.Client:
        if not hasattr(local, "client"):
            with lock:
                local.client = clients[next(counter)]
        return local.client

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        latencies = list(pool.map(lambda item: item[1](client(), urls[item[0] % len(urls)]), enumerate(work)))
    wall = time.perf_counter() - started
    for c in clients:
        c.close()
    return wall, latencies


def lookup(name: str) -> Callable[[httpx.Client, str], float]:
    return lambda c, url: timed(lambda: c.get(f"{url}/v1/interventions/{name}"), 200)


def chat(name: str) -> Callable[[httpx.Client, str], float]:
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    return lambda c, url: timed(lambda: c.post(f"{url}/v1/chat/completions", json=body), 200)


def page(after: str) -> Callable[[httpx.Client, str], float]:
    """One page of 100 of the listing, from a random place in it."""
    params = {"limit": 100} | ({"after": after} if after else {})
    return lambda c, url: timed(lambda: c.get(f"{url}/v1/interventions", params=params), 200)


def upload(name: str, payload: bytes) -> Callable[[httpx.Client, str], float]:
    return lambda c, url: timed(lambda: c.post(f"{url}/v1/interventions", data={"name": name},
                                               files={"file": ("a.safetensors", payload)}), 201)


def in_process(location: Path | str, fingerprint: ModelFingerprint, size: int, args: argparse.Namespace
               ) -> tuple[float, tuple[float, float], float]:
    """The store alone, without HTTP or the event loop: (open ms, `get` of random names p50/p99 ms, quota-checked
    puts/s from one thread), as the server calls them."""
    rng = random.Random(size + 1)
    started = time.perf_counter()
    store = ArtifactStore(location, fingerprint, keep_versions=10)
    open_ms = 1000 * (time.perf_counter() - started)
    gets = []
    for _ in range(args.lookups * 4 if size else 0):
        name = f"{PREFIX}{rng.randrange(size):07d}"
        started = time.perf_counter()
        store.get(name)
        gets.append(time.perf_counter() - started)
    quota = StorageQuota(max_interventions=10**6, max_bytes=10**11)
    payloads = [artifact(fingerprint, 30_000_000 + i) for i in range(args.uploads)]
    started = time.perf_counter()
    for i, payload in enumerate(payloads):
        store.put(f"inproc-{i}", payload, quota=quota)
    puts = len(payloads) / (time.perf_counter() - started)
    for i in range(len(payloads)):  # leave the registry at its size for the server run
        store.delete(f"inproc-{i}")
    store.close()
    return open_ms, quantiles(gets or [0.0]), puts


@dataclass
class Row:
    backend: str
    size: int
    build_s: float
    open_ms: float
    get_ms: tuple[float, float]
    puts_per_s: float
    start_s: float
    lookup_ms: tuple[float, float]
    chat_ms: tuple[float, float]
    page_ms: tuple[float, float]
    uploads_per_s: float
    upload_ms: tuple[float, float]
    rss_mb: float


def measure(backend: str, size: int, store_arg: str, data_dir: Path, model_dir: Path, fingerprint: ModelFingerprint,
            build_s: float, args: argparse.Namespace) -> Row:
    location = Path(store_arg.removeprefix("sqlite://")) / "store" if backend == "sqlite" else store_arg
    store_side = in_process(location, fingerprint, size, args)
    rng = random.Random(size)
    started = time.perf_counter()
    with server_process(model_dir, data_dir, "--store", store_arg, *LIMITS, ready_timeout=300) as (process, url):
        start_s = time.perf_counter() - started
        names = [f"{PREFIX}{rng.randrange(size):07d}" for _ in range(args.lookups)] if size else []
        _, lookups = spread([url], [lookup(n) for n in names], 1) if names else (0, [0.0])
        _, chats = spread([url], [chat(n) for n in names[:args.chats]], 1) if names else (0, [0.0])
        pages = [page(n) for n in names[:args.chats]] or [page("")]
        _, page_latencies = spread([url], pages, 1)
        rss = tree_rss_bytes(process.pid)
        payloads = [artifact(fingerprint, 10_000_000 + i) for i in range(args.uploads)]
        work = [upload(f"new-{backend}-{size}-{i}", p) for i, p in enumerate(payloads)]
        wall, uploads = spread([url], work, 4)
    return Row(backend, size, build_s, *store_side, start_s, quantiles(lookups), quantiles(chats), quantiles(page_latencies),
               len(work) / wall,
               quantiles(uploads), rss / 2**20)


@dataclass
class ReplicaRow:
    setup: str
    lookups_per_s: float
    lookup_ms: tuple[float, float]
    uploads_per_s: float
    upload_ms: tuple[float, float]


def replicas(setup: str, store_arg: str, size: int, count: int, data_dir: Path, model_dir: Path,
             fingerprint: ModelFingerprint, args: argparse.Namespace) -> ReplicaRow:
    rng = random.Random(7)
    managers = [server_process(model_dir, data_dir / f"r{i}", "--store", store_arg, *LIMITS, ready_timeout=300)
                for i in range(count)]
    with ExitStack() as stack:
        urls = [stack.enter_context(manager)[1] for manager in managers]
        names = [f"{PREFIX}{rng.randrange(size):07d}" for _ in range(args.lookups * 2)]
        wall, lookups = spread(urls, [lookup(n) for n in names], 8)
        payloads = [artifact(fingerprint, 20_000_000 + i) for i in range(args.uploads)]
        tag = uuid.uuid4().hex[:8]
        upload_wall, uploads = spread(urls, [upload(f"r-{tag}-{i}", p) for i, p in enumerate(payloads)], 8)
    return ReplicaRow(setup, len(names) / wall, quantiles(lookups), len(payloads) / upload_wall, quantiles(uploads))


def tables(rows: list[Row], replica_rows: list[ReplicaRow], args: argparse.Namespace) -> str:
    empty = {row.backend: row.rss_mb for row in rows if row.size == 0}
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"`bench/registry_scale.py --sizes {' '.join(map(str, args.sizes))}`, {args.lookups} lookups, "
        f"{args.chats} chats, {args.uploads} uploads per row; {datetime.now(timezone.utc):%Y-%m-%d}.",
        "",
        "| store | personas | build (bulk) | store open | store get p50 / p99 | store puts/s | start to /ready "
        "| HTTP lookup p50 / p99 | chat max_tokens=1 p50 / p99 | list page of 100 p50 / p99 | uploads/s (4 clients) "
        "| upload p50 / p99 | RSS | RSS over empty |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        over = row.rss_mb - empty.get(row.backend, row.rss_mb)
        lines.append(
            f"| {row.backend} | {row.size:,} | {row.build_s:.0f} s | {row.open_ms:.0f} ms | "
            f"{row.get_ms[0]:.2f} / {row.get_ms[1]:.2f} ms | {row.puts_per_s:.0f} | {row.start_s:.1f} s | "
            f"{row.lookup_ms[0]:.1f} / {row.lookup_ms[1]:.1f} ms | {row.chat_ms[0]:.1f} / {row.chat_ms[1]:.1f} ms | "
            f"{row.page_ms[0]:.1f} / {row.page_ms[1]:.1f} ms | "
            f"{row.uploads_per_s:.0f} | {row.upload_ms[0]:.0f} / {row.upload_ms[1]:.0f} ms | {row.rss_mb:.0f} MB | "
            f"{over:+.0f} MB |")
    if replica_rows:
        lines += ["", "| replicas (8 client threads, round-robin) | lookups/s | lookup p50 / p99 | uploads/s "
                  "| upload p50 / p99 |", "|---|---:|---:|---:|---:|"]
        for r in replica_rows:
            lines.append(f"| {r.setup} | {r.lookups_per_s:.0f} | {r.lookup_ms[0]:.1f} / {r.lookup_ms[1]:.1f} ms | "
                         f"{r.uploads_per_s:.0f} | {r.upload_ms[0]:.0f} / {r.upload_ms[1]:.0f} ms |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    parser.add_argument("--lookups", type=int, default=1000)
    parser.add_argument("--chats", type=int, default=200)
    parser.add_argument("--uploads", type=int, default=300)
    parser.add_argument("--no-replicas", action="store_true")
    parser.add_argument("--write", action="store_true", help="write the tables into BENCHMARKS.md")
    args = parser.parse_args()
    rows: list[Row] = []
    replica_rows: list[ReplicaRow] = []
    with tempfile.TemporaryDirectory(prefix="reft-scale-") as tmp:
        work = Path(tmp)
        model_dir = tiny.save_tiny_model_dir(work / "model")
        fingerprint = fingerprint_model(tiny.tiny_llama())
        for backend in args.backends:
            with ExitStack() as stack:
                for size in [0, *args.sizes]:
                    started = time.perf_counter()
                    if backend == "sqlite":
                        store_dir = work / f"sqlite-{size}"
                        build_sqlite(store_dir / "store", fingerprint, size)
                        store_arg = f"sqlite://{store_dir}"
                    else:
                        store_arg = stack.enter_context(postgres_database())
                        build_postgres(store_arg, fingerprint, size)
                    build_s = time.perf_counter() - started
                    row = measure(backend, size, store_arg, work / f"run-{backend}-{size}", model_dir, fingerprint,
                                  build_s, args)
                    rows.append(row)
                    print(tables([row], [], args).splitlines()[-1], flush=True)
                if not args.no_replicas and backend == "postgres" and args.sizes:
                    size = args.sizes[-1]
                    for count in (1, 3):
                        replica_rows.append(replicas(f"PostgreSQL, {size:,} personas, {count} replica(s)", store_arg,
                                                     size, count, work / f"rep-{count}", model_dir, fingerprint, args))
                        print(replica_rows[-1], flush=True)
            if not args.no_replicas and backend == "sqlite" and args.sizes:
                size = args.sizes[-1]
                replica_rows.append(replicas(f"SQLite, {size:,} personas, 1 replica", f"sqlite://{work}/sqlite-{size}",
                                             size, 1, work / "rep-sqlite", model_dir, fingerprint, args))
                print(replica_rows[-1], flush=True)
    text = tables(rows, replica_rows, args)
    print(text)
    if args.write:
        section = f"{SECTION}\n\n{text}"
        write_section(ROOT / "BENCHMARKS.md", SECTION, section)


if __name__ == "__main__":
    main()
