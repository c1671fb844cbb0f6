"""Quotas and retention: checked in the write's transaction, every kept version counted, unreferenced files removed."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from adapters_store import ArtifactStore, InterventionNotFoundError, QuotaExceededError, StorageQuota
from reft_core.fingerprint import ModelFingerprint
from tests.adapters_store.conftest import NewLocation, make_payload

UNLIMITED_BYTES = 1 << 40


def test_concurrent_puts_never_exceed_the_intervention_quota(store: ArtifactStore, fingerprint) -> None:
    payloads = [make_payload(fingerprint, seed) for seed in range(24)]
    quota = StorageQuota(max_interventions=5, max_bytes=UNLIMITED_BYTES)
    outcomes: list[str] = []
    start = threading.Barrier(len(payloads))

    def put(index: int) -> None:
        start.wait()
        try:
            store.put(f"n{index}", payloads[index], tenant="acme", quota=quota)
            outcomes.append("stored")
        except QuotaExceededError:
            outcomes.append("refused")

    threads = [threading.Thread(target=put, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("stored") == 5 and len(store.list("acme")) == 5
    assert len(store.blob_addresses()) == 5  # refused puts left no artifact behind


def test_usage_counts_every_retained_version(root: Path, fingerprint: ModelFingerprint) -> None:
    store = ArtifactStore(root, fingerprint, keep_versions=3)
    sizes = [store.put("p", make_payload(fingerprint, 0)).size_bytes]
    for seed in range(1, 3):
        sizes.append(store.put("p", make_payload(fingerprint, seed), replace=True).size_bytes)
    assert store.usage("default") == (1, sum(sizes))


def test_bytes_quota_counts_old_versions_and_credits_what_retention_drops(
    new_location: NewLocation, fingerprint: ModelFingerprint
) -> None:
    size = len(make_payload(fingerprint, 0))
    keep_all = ArtifactStore(new_location(), fingerprint)
    quota = StorageQuota(max_interventions=10, max_bytes=2 * size)
    keep_all.put("p", make_payload(fingerprint, 0), quota=quota)
    keep_all.put("p", make_payload(fingerprint, 1), replace=True, quota=quota)
    with pytest.raises(QuotaExceededError, match="every retained version counts"):
        keep_all.put("p", make_payload(fingerprint, 2), replace=True, quota=quota)  # three versions kept: too many
    assert keep_all.get("p").version == 2 and len(keep_all.blob_addresses()) == 2
    keep_two = ArtifactStore(new_location(), fingerprint, keep_versions=2)
    for seed in range(5):  # each replace drops the oldest version, so two versions always fit
        keep_two.put("p", make_payload(fingerprint, seed), replace=seed > 0, quota=quota)
    assert keep_two.usage("default") == (1, 2 * size)


def test_replaces_beyond_retention_and_a_delete_leave_no_unreferenced_file(
    root: Path, fingerprint: ModelFingerprint
) -> None:
    store = ArtifactStore(root, fingerprint, keep_versions=3)
    for seed in range(12):
        store.put("p", make_payload(fingerprint, seed), replace=seed > 0)
    assert store.get("p").version == 12 and store.get_version("p", 10).version == 10
    with pytest.raises(InterventionNotFoundError):
        store.get_version("p", 9)  # dropped by the retention rule
    assert len(store.blob_addresses()) == 3 and store.stats().versions == 3
    kept = store.put("other", make_payload(fingerprint, 11))  # shares its file with the current "p"
    store.delete("p")
    assert store.blob_addresses() == {kept.file_sha256} and store.gc() == 0
    store.delete("other")
    assert store.blob_addresses() == set()


def _recounted(store: ArtifactStore, tenant: str) -> tuple[int, int]:
    """What the quota counts, summed from the records themselves (the counters must always equal this)."""
    names = store.list(tenant)
    versions = sum(v.size_bytes for r in names for v in store.versions(r.name, tenant)[0])
    files = sum(f.size_bytes for f in store.training_files.list(tenant))
    return len(names), versions + files


def test_usage_counters_equal_the_records_after_every_kind_of_write(
    root: Path, fingerprint: ModelFingerprint
) -> None:
    """The per-tenant counters (kept by triggers) against sums over the records, after each write that adds or
    drops a version, a name or a training file, in two tenants; a reopened store reads the same counters."""
    store = ArtifactStore(root, fingerprint, keep_versions=2)
    payloads = [make_payload(fingerprint, seed) for seed in range(6)]
    writes = [
        lambda: store.put("a", payloads[0], tenant="acme"),
        lambda: store.put("b", payloads[1], tenant="acme"),
        lambda: store.put("a", payloads[2], tenant="acme", replace=True),
        lambda: store.put("a", payloads[3], tenant="acme", replace=True),  # retention drops version 1
        lambda: store.put("a", payloads[0], tenant="other"),  # the same bytes in another tenant count there too
        lambda: store.promote("a", 2, tenant="acme"),
        lambda: store.delete_version("a", 3, tenant="acme"),
        lambda: store.training_files.put("acme", "f.jsonl", "fine-tune", b'{"prompt": "a", "completion": "b"}\n'),
        lambda: store.put("c", payloads[4], tenant="acme", upsert=True),
        lambda: store.delete("b", tenant="acme"),
        lambda: store.training_files.delete("acme", store.training_files.list("acme")[0].id),
        lambda: store.delete("a", tenant="other"),
    ]
    for step, write in enumerate(writes):
        write()
        for tenant in ("acme", "other", "nobody"):
            assert store.usage(tenant) == _recounted(store, tenant), (step, tenant)
    assert store.usage("acme") != (0, 0) and store.usage("other") == (0, 0)
    store.close()
    reopened = ArtifactStore(root, fingerprint, keep_versions=2)
    assert reopened.usage("acme") == _recounted(reopened, "acme")
    reopened.close()
