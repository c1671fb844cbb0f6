"""Copy everything from one store to another (`reft-serve admin migrate --from URL --to URL`), then verify it.

What moves: tenants and their API keys (hashes only: keys keep working, secrets were never stored), every
intervention with all its retained versions (version numbers, the current pointer, the public flag and the
highest number ever given are kept, so `name@N` pins mean the same afterwards), and training job records. Every
artifact is checked against its recorded sha256 when read from the source and again when read back from the
destination; the copy is refused name by name if the destination already holds that name with other content.
Stop the servers on the source first: writes made during the copy may be missed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from adapters_store.backend import StoreBackend, is_postgres_url, sqlite_path
from adapters_store.errors import StoreError
from adapters_store.jobs import open_jobs
from adapters_store.local import LocalBackend
from adapters_store.records import InterventionRecord
from adapters_store.tenants import ApiKey, open_tenants


class MigrationError(StoreError):
    """The copy cannot be made or does not verify; the message names what differs."""


@dataclass
class MigrationReport:
    tenants: int = 0
    keys: int = 0
    interventions: int = 0
    versions: int = 0
    jobs: int = 0
    skipped: list[str] = field(default_factory=list)  # names already in the destination with the same content


def open_backend(location: Path | str) -> StoreBackend:
    if is_postgres_url(location):
        from adapters_store.postgres.artifacts import PostgresBackend

        return PostgresBackend(str(location))
    return LocalBackend(sqlite_path(location) / "store")


def _parts(location: Path | str, part: str) -> Path | str:
    return location if is_postgres_url(location) else sqlite_path(location) / part


def migrate(source: Path | str, destination: Path | str) -> MigrationReport:
    report = MigrationReport()
    _copy_tenants(source, destination, report)
    src, dst = open_backend(source), open_backend(destination)
    try:
        for tenant, name in src.list_names():
            _copy_name(src, dst, tenant, name, report)
        _verify(src, dst)
    finally:
        src.close()
        dst.close()
    _copy_jobs(source, destination, report)
    return report


def _copy_tenants(source: Path | str, destination: Path | str, report: MigrationReport) -> None:
    src, dst = open_tenants(_parts(source, "")), open_tenants(_parts(destination, ""))
    try:
        for tenant in src.list_tenants():
            dst.import_tenant(tenant)
            report.tenants += 1
        for key_id, tenant_name, created, revoked, secret_sha256 in src.key_hashes():
            dst.import_key(ApiKey(key_id, tenant_name, created, revoked), secret_sha256)
            report.keys += 1
        if sorted(dst.key_hashes()) != sorted(src.key_hashes()):
            raise MigrationError("the destination's API keys differ from the source's (was it written to meanwhile?)")
    finally:
        src.close()
        dst.close()


def _copy_name(src: StoreBackend, dst: StoreBackend, tenant: str, name: str, report: MigrationReport) -> None:
    found = src.history(tenant, name)
    if found is None:
        return  # deleted meanwhile
    history, current = found
    versions = [(record, _checked(src, record)) for record in reversed(history)]  # oldest first
    existing = dst.history(tenant, name)
    if existing is not None:
        if _identity(existing[0]) != _identity(history):
            raise MigrationError(f"'{tenant}/{name}' already exists in the destination with other versions")
        report.skipped.append(f"{tenant}/{name}")
        return
    dst.import_name(versions, current, history[0].public, max(src.latest(tenant, name), history[0].version))
    report.interventions += 1
    report.versions += len(versions)


def _verify(src: StoreBackend, dst: StoreBackend) -> None:
    """Every source name is in the destination with the same versions, pointer and flag, and every copied
    artifact reads back with its recorded hash."""
    for tenant, name in src.list_names():
        before, after = src.history(tenant, name), dst.history(tenant, name)
        if before is None:
            continue
        if after is None or after[1] != before[1] or _identity(after[0]) != _identity(before[0]):
            raise MigrationError(f"'{tenant}/{name}' differs in the destination after the copy")
        for record in after[0]:
            _checked(dst, record)


def _copy_jobs(source: Path | str, destination: Path | str, report: MigrationReport) -> None:
    src, dst = open_jobs(_parts(source, "jobs")), open_jobs(_parts(destination, "jobs"))
    try:
        for job in src.all():
            dst.save(job)
            report.jobs += 1
    finally:
        src.close()
        dst.close()


def _checked(backend: StoreBackend, record: InterventionRecord) -> bytes:
    payload = backend.read_blob(record.file_sha256)
    if hashlib.sha256(payload).hexdigest() != record.file_sha256:
        raise MigrationError(f"'{record.tenant}/{record.name}' v{record.version} is corrupt in {backend.location}: "
                             "digest mismatch")
    return payload


def _identity(history: list[InterventionRecord]) -> list[tuple[int, str, str, bool]]:
    return [(r.version, r.digest, r.file_sha256, r.public) for r in history]
