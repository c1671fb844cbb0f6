"""`admin migrate`: a local store copied to PostgreSQL and back keeps every tenant, key, version number, pointer,
public flag and byte; a corrupt artifact in the source stops the copy with its name."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters_store import ArtifactStore
from adapters_store.jobs import JobRecord, open_jobs
from adapters_store.migrate import MigrationError, migrate
from adapters_store.tenants import open_tenants
from reft_core.fingerprint import ModelFingerprint
from server.cli import main
from tests.adapters_store.conftest import make_payload
from tests.store_faults import corrupt_artifact


def fill(data_dir: Path, fingerprint: ModelFingerprint) -> str:
    """A data directory with two tenants, versions with a promote and a deleted newest version, a public name, a
    revoked key and a job; returns a live key."""
    tenants = open_tenants(data_dir)
    tenants.create_tenant("acme", {"requests_per_minute": 7})
    _, key = tenants.create_key("acme")
    tenants.revoke_key(tenants.create_key("acme")[0].id)
    tenants.close()
    store = ArtifactStore(data_dir / "store", fingerprint)
    for seed in range(4):
        store.put("p", make_payload(fingerprint, seed), tenant="acme", upsert=True)
    store.promote("p", 2, tenant="acme")
    store.delete_version("p", 4, tenant="acme")
    store.put("shared", make_payload(fingerprint, 9))
    store.set_public("shared", True)
    store.close()
    jobs = open_jobs(data_dir / "jobs")
    jobs.save(JobRecord(id="ftjob-1", name="p", status="succeeded", spec={"examples": 3}, tenant="acme"))
    jobs.close()
    return key


def snapshot(location: Path | str, fingerprint: ModelFingerprint) -> dict:
    store = ArtifactStore(location if not isinstance(location, Path) else location / "store", fingerprint)
    names = store.list_names()
    state = {"names": names, "history": [store.versions(n, t) for t, n in names],
             "bytes": {r.file_sha256: store.read_artifact(r) for t, n in names for r in store.versions(n, t)[0]}}
    store.close()
    return state


def test_local_to_postgres_and_back_keeps_everything(tmp_path: Path, postgres, fingerprint: ModelFingerprint,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    key = fill(tmp_path / "a", fingerprint)
    url = postgres.new_schema()
    assert main(["admin", "migrate", "--from", f"sqlite://{tmp_path / 'a'}", "--to", url]) == 0
    assert '"verified": true' in capsys.readouterr().out
    migrate(url, tmp_path / "b")
    before = snapshot(tmp_path / "a", fingerprint)
    for location in (url, tmp_path / "b"):
        assert snapshot(location, fingerprint) == before
        tenants = open_tenants(location if isinstance(location, str) else location)
        assert tenants.authenticate(key) == "acme" and tenants.get_tenant("acme").limits == {"requests_per_minute": 7}
        assert [k.revoked_at is not None for k in tenants.list_keys("acme")] == [False, True]
        tenants.close()
    store = ArtifactStore(url, fingerprint)
    assert store.get("p", "acme").version == 2  # the promoted pointer, not the newest
    assert store.put("p", make_payload(fingerprint, 5), tenant="acme", replace=True).version == 5  # 4 is not reused
    store.close()
    jobs = open_jobs(url)
    assert [j.id for j in jobs.list("acme")] == ["ftjob-1"]
    jobs.close()
    assert migrate(tmp_path / "a", tmp_path / "b").skipped == ["acme/p", "default/shared"]  # again: nothing changes
    postgres.close_connections(url)


def test_a_corrupt_source_artifact_stops_the_copy(tmp_path: Path, fingerprint: ModelFingerprint) -> None:
    fill(tmp_path / "a", fingerprint)
    store = ArtifactStore(tmp_path / "a" / "store", fingerprint)
    corrupt_artifact(store, store.get("shared").file_sha256)
    with pytest.raises(MigrationError, match="'default/shared' v1 is corrupt"):
        migrate(tmp_path / "a", tmp_path / "b")
