"""Crash consistency, garbage collection, on-disk corruption, write failures and read-only roots: the local
backend's files and SQLite index (the PostgreSQL backend's counterparts are in test_postgres.py)."""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from adapters_store import (
    ArtifactStore,
    ArtifactUnavailableError,
    InterventionNotFoundError,
    StoreError,
    StoreWriteError,
)
from reft_core.fingerprint import ModelFingerprint
from tests.adapters_store.conftest import make_payload


@pytest.fixture
def root(local_root: Path) -> Path:
    return local_root


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_file_makes_only_that_intervention_unavailable(
    store: ArtifactStore, fingerprint: ModelFingerprint
) -> None:
    bad, good = store.put("bad", make_payload(fingerprint, 1)), store.put("good", make_payload(fingerprint, 2))
    flip_last_byte(store.files.path_for(bad.file_sha256))
    with pytest.raises(ArtifactUnavailableError, match="'bad' v1 is unavailable: corrupt on disk: digest mismatch"):
        store.read_artifact(bad)
    with pytest.raises(ArtifactUnavailableError, match="corrupt on disk"):
        store.load(bad)
    assert store.load(good).digest == good.digest
    store.files.path_for(bad.file_sha256).unlink()
    with pytest.raises(ArtifactUnavailableError, match="'bad' v1 is unavailable: file missing"):
        store.load(bad)
    assert store.load(good).digest == good.digest


def test_putting_identical_content_heals_a_corrupt_copy(store: ArtifactStore, fingerprint: ModelFingerprint) -> None:
    first = store.put("first", make_payload(fingerprint))
    flip_last_byte(store.files.path_for(first.file_sha256))
    store.put("second", make_payload(fingerprint))
    assert store.load(first).digest == first.digest


@pytest.mark.parametrize("replace", [False, True])
def test_crash_between_file_write_and_index_commit(
    store: ArtifactStore, fingerprint: ModelFingerprint, monkeypatch: pytest.MonkeyPatch, replace: bool
) -> None:
    old = store.put("x", make_payload(fingerprint, 1)) if replace else None

    def crash(*_args: object) -> None:
        raise KeyboardInterrupt  # stands in for a kill after the file is written, before the commit

    monkeypatch.setattr(store.index, "_insert", crash)
    with pytest.raises(KeyboardInterrupt):
        store.put("x", make_payload(fingerprint, 2), replace=replace)
    monkeypatch.undo()
    reopened = ArtifactStore(store.root, fingerprint)  # what a restarted process sees
    for view in (store, reopened):
        if old is None:
            assert view.list() == [] and view.stats().versions == 0
            with pytest.raises(InterventionNotFoundError):
                view.get("x")
        else:
            assert view.list() == [old] and view.load(old).digest == old.digest
    assert len(store.files.all_files()) == (2 if replace else 1)
    assert store.gc() == 1 and len(store.files.all_files()) == (1 if replace else 0)
    assert store.put("x", make_payload(fingerprint, 2), replace=replace).version == (2 if replace else 1)


def test_gc_removes_stale_temp_files_and_keeps_referenced_ones(
    store: ArtifactStore, fingerprint: ModelFingerprint
) -> None:
    kept = store.put("kept", make_payload(fingerprint, 1))
    shard = store.files.path_for(kept.file_sha256).parent
    (shard / ".leftover.abc123.partial").write_bytes(b"half an artifact")
    assert store.gc() == 1 and store.gc() == 0
    assert store.files.all_files() == [store.files.path_for(kept.file_sha256)] and store.load(kept)


def test_gc_cannot_remove_the_file_of_a_put_in_progress(
    store: ArtifactStore, fingerprint: ModelFingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = store.files.write
    collected: list[int] = []
    collector = threading.Thread(target=lambda: collected.append(store.gc()))

    def write_then_collect(payload: bytes) -> str:
        address = write(payload)
        collector.start()  # the file exists but no row references it yet: gc must wait for the commit
        collector.join(timeout=0.5)
        return address

    monkeypatch.setattr(store.files, "write", write_then_collect)
    record = store.put("p", make_payload(fingerprint))
    collector.join()
    assert collected == [0] and store.load(record).digest == record.digest


def test_disk_full_is_a_clean_write_error(
    store: ArtifactStore, fingerprint: ModelFingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = store.put("kept", make_payload(fingerprint, 1))

    def full(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(StoreWriteError, match="disk full"):
        store.put("new", make_payload(fingerprint, 2))
    with pytest.raises(StoreWriteError, match="disk full"):
        store.put("kept", make_payload(fingerprint, 3), replace=True)
    monkeypatch.undo()
    assert store.list() == [kept] and store.load(kept).digest == kept.digest
    assert store.files.all_files() == [store.files.path_for(kept.file_sha256)] and not store.files.temp_files()


def test_index_write_failure_is_a_clean_write_error(
    store: ArtifactStore, fingerprint: ModelFingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = store.put("kept", make_payload(fingerprint, 1))

    def full(*_args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store.index, "_insert", full)
    with pytest.raises(StoreWriteError, match="disk full"):
        store.put("kept", make_payload(fingerprint, 2), replace=True)
    monkeypatch.undo()
    assert store.get("kept") == kept and store.stats().versions == 1


def assert_serves_reads_and_refuses_writes(store: ArtifactStore, fingerprint: ModelFingerprint) -> None:
    record = store.get("a")
    assert store.read_only and store.list() == [record] and store.load(record).digest == record.digest
    with pytest.raises(StoreWriteError, match="read-only"):
        store.put("b", make_payload(fingerprint, 3))
    with pytest.raises(StoreWriteError, match="read-only"):
        store.delete("a")
    with pytest.raises(StoreWriteError, match="read-only"):
        store.gc()


@pytest.fixture
def read_only_root(root: Path) -> Iterator[Path]:
    paths = [root, *(path for path in root.rglob("*") if path.is_dir())]
    for path in paths:
        path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    yield root
    for path in paths:
        path.chmod(stat.S_IRWXU)


def test_simulated_read_only_root_serves_reads(
    store: ArtifactStore, fingerprint: ModelFingerprint, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put("a", make_payload(fingerprint))
    monkeypatch.setattr(os, "access", lambda *_args, **_kwargs: False)  # what a read-only mount reports
    assert_serves_reads_and_refuses_writes(ArtifactStore(root, fingerprint), fingerprint)


def test_read_only_root_without_an_index_is_a_clear_error(
    root: Path, fingerprint: ModelFingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    root.mkdir()
    monkeypatch.setattr(os, "access", lambda *_args, **_kwargs: False)
    with pytest.raises(StoreError, match="read-only and has no index"):
        ArtifactStore(root, fingerprint)


def test_an_index_from_a_newer_build_is_refused(store: ArtifactStore, root: Path, fingerprint: ModelFingerprint) -> None:
    store.close()
    with sqlite3.connect(root / "index.sqlite3") as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StoreError, match="schema version 99, newer"):
        ArtifactStore(root, fingerprint)


def test_a_version_1_index_is_migrated_keeping_its_records(root: Path, fingerprint: ModelFingerprint) -> None:
    """An index written before `public` existed opens, keeps every record, and can then mark names public."""
    store = ArtifactStore(root, fingerprint)
    kept = store.put("old", make_payload(fingerprint, 1))
    store.close()
    with sqlite3.connect(root / "index.sqlite3") as db:  # rebuild `current` as schema version 1 had it
        db.execute("CREATE TABLE current_v1 (tenant TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, "
                   "PRIMARY KEY (tenant, name))")
        db.execute("INSERT INTO current_v1 SELECT tenant, name, version FROM current")
        db.execute("DROP TABLE current")
        db.execute("ALTER TABLE current_v1 RENAME TO current")
        db.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    reopened = ArtifactStore(root, fingerprint)
    assert reopened.get("old") == kept and not kept.public
    assert reopened.set_public("old", True).public and reopened.list_public() == [replace(kept, public=True)]
