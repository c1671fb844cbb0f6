"""Store versions: history with the current pointer, promote, deleting one version, numbers never reused, upsert,
descriptions kept by a replace that gives none, and the schema-2 migration of the `latest` counter."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from adapters_store import (
    MAX_VERSION,
    ArtifactStore,
    InterventionExistsError,
    InterventionNotFoundError,
    QuotaExceededError,
    StorageQuota,
    VersionIsCurrentError,
)
from reft_core.fingerprint import ModelFingerprint
from tests.adapters_store.conftest import make_payload


def three_versions(store: ArtifactStore, fingerprint: ModelFingerprint, name: str = "p") -> list:
    first = store.put(name, make_payload(fingerprint, 1))
    return [first] + [store.put(name, make_payload(fingerprint, seed), replace=True) for seed in (2, 3)]


def test_history_lists_versions_newest_first_with_the_current_one(store, fingerprint) -> None:
    records = three_versions(store, fingerprint)
    history, current = store.versions("p")
    assert [r.version for r in history] == [3, 2, 1] and current == 3
    assert [r.digest for r in history] == [r.digest for r in reversed(records)]
    with pytest.raises(InterventionNotFoundError):
        store.versions("ghost")
    with pytest.raises(InterventionNotFoundError):
        store.versions("p", tenant="other")  # names are per tenant


def test_promote_moves_the_pointer_without_new_rows_or_bytes(store, fingerprint) -> None:
    first, _, third = three_versions(store, fingerprint)
    before = store.stats()
    promoted = store.promote("p", 1)
    assert promoted == first and store.get("p") == first and store.versions("p")[1] == 1
    assert store.stats() == before  # a pointer move: no row, no file
    assert store.promote("p", 1) == first  # promoting the current version changes nothing
    assert store.promote("p", 3) == third and store.get("p") == third  # and back again (rollback of the rollback)


@pytest.mark.parametrize("version", [0, -1, 4, MAX_VERSION + 1, 2**70])
def test_promote_or_delete_of_an_unknown_version_is_not_found(store, fingerprint, version: int) -> None:
    three_versions(store, fingerprint)
    with pytest.raises(InterventionNotFoundError):
        store.promote("p", version)
    with pytest.raises(InterventionNotFoundError):
        store.delete_version("p", version)
    with pytest.raises(InterventionNotFoundError):
        store.get_version("p", version)
    assert store.get("p").version == 3


def test_other_tenants_versions_are_not_found(store, fingerprint) -> None:
    three_versions(store, fingerprint)
    for act in (lambda: store.promote("p", 1, tenant="globex"), lambda: store.delete_version("p", 1, tenant="globex"),
                lambda: store.get_version("p", 1, tenant="globex")):
        with pytest.raises(InterventionNotFoundError):
            act()
    assert store.versions("p")[1] == 3 and len(store.versions("p")[0]) == 3


def test_deleting_one_version_removes_its_row_and_file_but_never_the_current_one(store, fingerprint) -> None:
    first, second, third = three_versions(store, fingerprint)
    with pytest.raises(VersionIsCurrentError, match="promote another version first"):
        store.delete_version("p", 3)
    store.delete_version("p", 1)
    assert [r.version for r in store.versions("p")[0]] == [3, 2]
    assert first.file_sha256 not in store.blob_addresses() and second.file_sha256 in store.blob_addresses()
    store.promote("p", 2)
    store.delete_version("p", 3)
    assert store.get("p") == second and store.gc() == 0  # nothing left behind


def test_a_file_shared_with_another_version_stays(store, fingerprint) -> None:
    payload = make_payload(fingerprint, 7)
    first = store.put("p", payload)
    store.put("p", make_payload(fingerprint, 8), replace=True)
    third = store.put("p", payload, replace=True)  # same bytes as v1: one file
    store.promote("p", 2)
    store.delete_version("p", 1)
    assert third.file_sha256 in store.blob_addresses() and store.read_artifact(third) == payload
    assert first.file_sha256 == third.file_sha256


def test_version_numbers_are_never_reused_after_deleting_the_newest(root: Path, store, fingerprint) -> None:
    three_versions(store, fingerprint)
    store.promote("p", 2)
    store.delete_version("p", 3)
    assert store.put("p", make_payload(fingerprint, 4), replace=True).version == 4  # not 3 again
    store.close()
    reopened = ArtifactStore(root, fingerprint)
    assert reopened.put("p", make_payload(fingerprint, 5), replace=True).version == 5


def test_retention_after_a_promote_drops_the_oldest_never_the_current(root: Path, fingerprint) -> None:
    store = ArtifactStore(root, fingerprint, keep_versions=3)
    three_versions(store, fingerprint)
    store.promote("p", 1)
    fourth = store.put("p", make_payload(fingerprint, 4), replace=True)
    history, current = store.versions("p")
    assert current == 4 and [r.version for r in history] == [4, 3, 2] and store.get("p") == fourth


def test_upsert_creates_or_replaces_and_counts_a_new_name_against_the_quota(store, fingerprint) -> None:
    quota = StorageQuota(max_interventions=1, max_bytes=10**9)
    assert store.put("p", make_payload(fingerprint, 1), upsert=True, quota=quota).version == 1
    assert store.put("p", make_payload(fingerprint, 2), upsert=True, quota=quota).version == 2
    with pytest.raises(QuotaExceededError):
        store.put("q", make_payload(fingerprint, 3), upsert=True, quota=quota)
    with pytest.raises(InterventionExistsError, match="replace=true"):
        store.put("p", make_payload(fingerprint, 4))


def test_a_replace_without_a_description_keeps_the_current_one(store, fingerprint) -> None:
    store.put("p", make_payload(fingerprint, 1), description="answers in emojis")
    kept = store.put("p", make_payload(fingerprint, 2), replace=True, description=None)
    assert kept.description == "answers in emojis"
    assert store.put("p", make_payload(fingerprint, 3), replace=True, description="new").description == "new"
    assert store.put("q", make_payload(fingerprint, 4), description=None).description == ""


def test_a_version_2_index_is_migrated_and_keeps_numbers_unique(local_root: Path, local_store, fingerprint) -> None:
    root, store = local_root, local_store  # a SQLite migration (PostgreSQL's schema started at this version)
    three_versions(store, fingerprint)
    store.promote("p", 2)
    store.close()
    with sqlite3.connect(root / "index.sqlite3") as db:  # `current` as schema version 2 had it
        db.execute("ALTER TABLE current DROP COLUMN latest")
        db.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    reopened = ArtifactStore(root, fingerprint)
    reopened.delete_version("p", 3)
    assert reopened.put("p", make_payload(fingerprint, 9), replace=True).version == 4
