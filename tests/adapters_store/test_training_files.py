"""Training files in the store, on both backends (the `store` / `new_location` fixtures): round trip, tenant
scoping, one bytes quota with artifacts (also under concurrent uploads, and across replicas on PostgreSQL); and the
migrations that add the table (SQLite schema 3 -> 4, the PostgreSQL artifacts schema 2 -> 3), and a read-only
local store."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters_store import (
    ArtifactStore,
    InvalidMetadataError,
    QuotaExceededError,
    StorageQuota,
    StoreWriteError,
    TrainingFileNotFoundError,
)
from adapters_store.postgres.artifacts import _MIGRATIONS as POSTGRES_MIGRATIONS
from reft_core.fingerprint import ModelFingerprint
from tests.adapters_store.conftest import NewLocation, make_payload

LINE = b'{"prompt": "a", "completion": "b"}\n'


def test_put_get_read_list_delete(store: ArtifactStore) -> None:
    files = store.training_files
    first = files.put("default", "a.jsonl", "fine-tune", LINE)
    second = files.put("default", "b.jsonl", "fine-tune", LINE * 2)
    assert first.id.startswith("file-") and first.id != second.id
    assert (first.filename, first.purpose, first.size_bytes, first.tenant) == ("a.jsonl", "fine-tune", len(LINE), "default")
    assert files.get("default", first.id) == first and files.read("default", second.id) == LINE * 2
    assert files.list("default") == [second, first]  # newest first
    assert files.list("default", purpose="fine-tune") == [second, first] and files.list("default", "other") == []
    files.delete("default", first.id)
    for call in (files.get, files.read, files.delete):
        with pytest.raises(TrainingFileNotFoundError, match=first.id):
            call("default", first.id)
    assert files.list("default") == [second]


def test_another_tenants_file_is_not_found(store: ArtifactStore) -> None:
    files = store.training_files
    mine = files.put("acme", "a.jsonl", "fine-tune", LINE)
    for call in (files.get, files.read, files.delete):
        with pytest.raises(TrainingFileNotFoundError):
            call("globex", mine.id)
    assert files.list("globex") == [] and files.read("acme", mine.id) == LINE


@pytest.mark.parametrize("purpose,filename", [("batch", "a.jsonl"), ("fine-tune", ""), ("fine-tune", "a\nb"),
                                              ("fine-tune", "x" * 256)])
def test_bad_metadata_is_refused(store: ArtifactStore, purpose: str, filename: str) -> None:
    with pytest.raises(InvalidMetadataError):
        store.training_files.put("default", filename, purpose, LINE)
    assert store.training_files.list("default") == []


# the location factory makes a fresh store per example (a directory, or a PostgreSQL schema)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 400), min_size=1, max_size=8), limit=st.integers(200, 1500))
def test_files_and_artifacts_share_one_bytes_quota(
    new_location: NewLocation, fingerprint: ModelFingerprint, sizes: list[int], limit: int
) -> None:
    """Whatever the order of uploads, what is stored never exceeds the quota, and each refusal was necessary."""
    store = ArtifactStore(new_location(), fingerprint)
    artifact = make_payload(fingerprint, 1)
    quota = StorageQuota(max_interventions=10, max_bytes=limit + len(artifact))
    store.put("p", artifact, quota=quota)
    for size in sizes:
        used = store.usage("default")[1]
        try:
            store.training_files.put("default", "f.jsonl", "fine-tune", b"x" * size, quota)
        except QuotaExceededError:
            assert used + size > quota.max_bytes
    assert store.usage("default")[1] == len(artifact) + sum(f.size_bytes for f in store.training_files.list("default"))
    assert store.usage("default")[1] <= quota.max_bytes
    if store.training_files.list("default"):  # and an artifact must now fit beside the files too
        with pytest.raises(QuotaExceededError):
            store.put("q", make_payload(fingerprint, 2), quota=StorageQuota(10, store.usage("default")[1]))
    store.close()


def test_concurrent_uploads_cannot_overshoot_the_quota(store: ArtifactStore) -> None:
    quota = StorageQuota(max_interventions=1, max_bytes=10 * len(LINE))
    stored: list[str] = []

    def upload() -> None:
        try:
            stored.append(store.training_files.put("default", "f.jsonl", "fine-tune", LINE, quota).id)
        except QuotaExceededError:
            pass

    threads = [threading.Thread(target=upload) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(stored) == 10 and store.usage("default")[1] == 10 * len(LINE)


def test_stores_on_one_location_share_the_files_and_the_quota(root: Path | str, fingerprint: ModelFingerprint) -> None:
    """Two store objects on one location (replicas on one database, or two processes on one directory): a file
    one stores, the other reads and deletes; artifacts and files racing through both never overshoot the quota."""
    stores = [ArtifactStore(root, fingerprint) for _ in range(2)]
    record = stores[0].training_files.put("acme", "a.jsonl", "fine-tune", LINE)
    assert stores[1].training_files.get("acme", record.id) == record and stores[1].training_files.list("acme") == [record]
    stores[1].training_files.delete("acme", record.id)
    assert stores[0].training_files.list("acme") == []
    payloads = [make_payload(fingerprint, seed) for seed in range(4)]
    quota = StorageQuota(max_interventions=10, max_bytes=2 * len(payloads[0]) + 2 * len(LINE))
    start = threading.Barrier(8)

    def write(index: int) -> None:
        start.wait()
        store = stores[index % 2]
        try:
            if index < 4:
                store.put(f"p{index}", payloads[index], tenant="acme", quota=quota)
            else:
                store.training_files.put("acme", "f.jsonl", "fine-tune", LINE * 2, quota)
        except QuotaExceededError:
            pass

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    artifacts, files = stores[0].list("acme"), stores[1].training_files.list("acme")
    used = sum(a.size_bytes for a in artifacts) + sum(f.size_bytes for f in files)
    assert stores[1].usage("acme") == (len(artifacts), used) and used <= quota.max_bytes
    assert artifacts or files  # the first write always fits
    for store in stores:
        store.close()


def test_a_postgres_artifacts_schema_2_is_migrated(postgres, fingerprint: ModelFingerprint) -> None:
    url = postgres.new_schema()
    try:
        store = ArtifactStore(url, fingerprint)
        kept = store.put("old", make_payload(fingerprint, 1))
        with store.backend.db.transaction() as cur:  # type: ignore[attr-defined]  # the schema as version 2 had it
            cur.execute("DROP TABLE training_files")
            cur.execute("UPDATE schema_versions SET version=2 WHERE component='artifacts'")
        store.close()
        reopened = ArtifactStore(url, fingerprint)
        assert reopened.get("old") == kept
        record = reopened.training_files.put("default", "a.jsonl", "fine-tune", LINE)
        assert reopened.training_files.read("default", record.id) == LINE
        assert reopened.usage("default") == (1, kept.size_bytes + len(LINE))
        with reopened.backend.db.transaction() as cur:  # type: ignore[attr-defined]
            row = cur.execute("SELECT version FROM schema_versions WHERE component='artifacts'").fetchone()
        assert row == (len(POSTGRES_MIGRATIONS),) == (4,)
        reopened.close()
    finally:
        postgres.close_connections(url)


def test_a_version_3_index_is_migrated(local_root: Path, fingerprint: ModelFingerprint) -> None:
    root = local_root
    store = ArtifactStore(root, fingerprint)
    kept = store.put("old", make_payload(fingerprint, 1))
    store.close()
    with sqlite3.connect(root / "index.sqlite3") as db:  # the index as schema version 3 had it
        db.execute("DROP TABLE training_files")
        db.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    reopened = ArtifactStore(root, fingerprint)
    assert reopened.get("old") == kept
    record = reopened.training_files.put("default", "a.jsonl", "fine-tune", LINE)
    assert reopened.training_files.read("default", record.id) == LINE
    assert reopened.usage("default") == (1, kept.size_bytes + len(LINE))


def test_a_read_only_store_serves_files_and_refuses_writes(
    local_root: Path, fingerprint: ModelFingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = local_root
    store = ArtifactStore(root, fingerprint)
    record = store.training_files.put("default", "a.jsonl", "fine-tune", LINE)
    store.close()
    monkeypatch.setattr(os, "access", lambda *_args, **_kwargs: False)  # what a read-only mount reports
    read_only = ArtifactStore(root, fingerprint)
    assert read_only.read_only and read_only.training_files.read("default", record.id) == LINE
    with pytest.raises(StoreWriteError, match="read-only"):
        read_only.training_files.put("default", "b.jsonl", "fine-tune", LINE)
    with pytest.raises(StoreWriteError, match="read-only"):
        read_only.training_files.delete("default", record.id)
    assert read_only.training_files.list("default") == [record]
