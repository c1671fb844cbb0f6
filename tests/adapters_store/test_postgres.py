"""What only the PostgreSQL backend has: several store objects (replicas) on one database, change notifications,
schema versions in the database, corruption of bytes kept in rows, and an unreachable database."""

from __future__ import annotations

import queue
import threading

import pytest

from adapters_store import ArtifactStore, ArtifactUnavailableError, QuotaExceededError, StorageQuota, StoreError
from adapters_store.errors import StoreUnavailableError
from adapters_store.postgres.db import Database
from reft_core.fingerprint import ModelFingerprint
from tests.adapters_store.conftest import make_payload
from tests.store_faults import corrupt_artifact


@pytest.fixture
def url(postgres) -> str:
    made = postgres.new_schema()
    yield made
    postgres.close_connections(made)


def test_replicas_together_never_pass_a_quota(url: str, fingerprint: ModelFingerprint) -> None:
    replicas = [ArtifactStore(url, fingerprint) for _ in range(3)]
    quota = StorageQuota(max_interventions=4, max_bytes=1 << 30)
    outcomes: list[str] = []
    start = threading.Barrier(12)

    def put(index: int) -> None:
        start.wait()
        try:
            replicas[index % 3].put(f"n{index}", make_payload(fingerprint, index), tenant="acme", quota=quota)
            outcomes.append("stored")
        except QuotaExceededError:
            outcomes.append("refused")

    threads = [threading.Thread(target=put, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("stored") == 4 and len(replicas[2].list("acme")) == 4
    for replica in replicas:
        replica.close()


def test_every_write_notifies_the_other_replicas(url: str, fingerprint: ModelFingerprint) -> None:
    writer, reader = ArtifactStore(url, fingerprint), ArtifactStore(url, fingerprint)
    heard: queue.Queue[tuple[str, str]] = queue.Queue()
    resets = threading.Event()
    assert reader.subscribe(lambda tenant, name: heard.put((tenant, name)), resets.set)
    assert reader.backend._listeners[0].connected.wait(10) and resets.is_set()  # type: ignore[attr-defined]
    writer.put("p", make_payload(fingerprint, 1), tenant="acme")
    writer.put("p", make_payload(fingerprint, 2), tenant="acme", replace=True)
    writer.promote("p", 1, tenant="acme")
    writer.set_public("p", True, tenant="acme")
    writer.delete_version("p", 2, tenant="acme")
    writer.delete("p", tenant="acme")
    assert [heard.get(timeout=1) for _ in range(6)] == [("acme", "p")] * 6
    writer.close()
    reader.close()


def test_corrupt_bytes_make_only_that_intervention_unavailable_and_a_put_heals_them(
    url: str, fingerprint: ModelFingerprint
) -> None:
    store = ArtifactStore(url, fingerprint)
    bad, good = store.put("bad", make_payload(fingerprint, 1)), store.put("good", make_payload(fingerprint, 2))
    corrupt_artifact(store, bad.file_sha256)
    with pytest.raises(ArtifactUnavailableError, match="'bad' v1 is unavailable: corrupt on disk: digest mismatch"):
        store.load(bad)
    assert store.load(good).digest == good.digest
    store.put("again", make_payload(fingerprint, 1))  # identical bytes: the stored copy is replaced
    assert store.load(bad).digest == bad.digest
    store.close()


def test_a_schema_from_a_newer_build_is_refused(url: str, fingerprint: ModelFingerprint) -> None:
    store = ArtifactStore(url, fingerprint)
    with store.backend.db.transaction() as cur:  # type: ignore[attr-defined]
        cur.execute("UPDATE schema_versions SET version=99 WHERE component='artifacts'")
    store.close()
    from adapters_store.postgres.artifacts import _MIGRATIONS

    with pytest.raises(StoreError, match=f"version 99, newer than this build's {len(_MIGRATIONS)}"):
        ArtifactStore(url, fingerprint)


def test_an_unreachable_database_is_a_clear_unavailable_error() -> None:
    with pytest.raises(StoreUnavailableError, match="cannot connect to the store database postgresql://127.0.0.1:1/x"):
        Database("postgresql://postgres@127.0.0.1:1/x?connect_timeout=1", open_timeout_s=0.5)
