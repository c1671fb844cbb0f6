"""Training files in the store: round trip, tenant scoping, one bytes quota with artifacts (also under concurrent
uploads), the schema-3 migration that adds the table, and a read-only store."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters_store import (
    ArtifactStore,
    InvalidMetadataError,
    QuotaExceededError,
    StorageQuota,
    StoreWriteError,
    TrainingFileNotFoundError,
)
from tests.adapters_store.conftest import make_payload

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


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 400), min_size=1, max_size=8), limit=st.integers(200, 1500))
def test_files_and_artifacts_share_one_bytes_quota(tmp_path_factory, fingerprint, sizes: list[int], limit: int) -> None:
    """Whatever the order of uploads, what is stored never exceeds the quota, and each refusal was necessary."""
    store = ArtifactStore(tmp_path_factory.mktemp("quota"), fingerprint)
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


def test_a_version_3_index_is_migrated(root: Path, fingerprint) -> None:
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


def test_a_read_only_store_serves_files_and_refuses_writes(root: Path, fingerprint, monkeypatch) -> None:
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
