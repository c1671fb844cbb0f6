"""What the artifact store needs from where it keeps things: the `StoreBackend` protocol, and opening one by URL.

Two backends implement it: `LocalBackend` (a SQLite index plus content-addressed files under one directory, the
embedded default) and `PostgresBackend` (index, versions and the artifact bytes themselves in one PostgreSQL
database, so any number of replicas share it). `ArtifactStore` validates and builds records; a backend only
persists them, and runs each write (quota check included) as one transaction. Both also keep the tenants'
uploaded training files (`put_file` ... `delete_file`, used through `adapters_store.training_files`), whose bytes
count in the same per-tenant byte quota as artifact versions: `usage` includes them, and `put_file` checks the
quota in its own write transaction, under the same lock as `add_version`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass
from typing import Protocol

from adapters_store.errors import (
    InterventionExistsError,
    InterventionNotFoundError,
    QuotaExceededError,
    StoreError,
)
from adapters_store.jobs import JobResult
from adapters_store.records import InterventionRecord, StorageQuota, TrainingFileRecord

MakeRecord = Callable[[int, InterventionRecord | None], InterventionRecord]


@dataclass(frozen=True)
class WriteRequest:
    """One new version to admit: the name, whether it replaces, its size, and the limits that apply to it."""

    tenant: str
    name: str
    replace: bool  # False: the name must be new; True: it must exist (PUT)
    size_bytes: int
    quota: StorageQuota | None = None  # None: unlimited (the library default; the server always passes one)
    keep_versions: int | None = None  # newest versions kept per name, the new one included; None: all
    upsert: bool = False  # the name may be new or existing (overrides `replace`): "replace": true in the API
    # the training job this version is the result of: PostgreSQL writes the version only while the job's owner still
    # holds it, and ends the job in the same transaction (JobLeaseLostError otherwise); the local backend (one
    # process, no leases) leaves the job's end to its caller
    job: JobResult | None = None

    def __post_init__(self) -> None:
        assert self.keep_versions is None or self.keep_versions >= 1, self.keep_versions


class StoreBackend(Protocol):
    read_only: bool
    location: str  # for messages: a directory, or a URL without its password

    def current(self, tenant: str, name: str) -> InterventionRecord | None: ...
    def version(self, tenant: str, name: str, version: int) -> InterventionRecord | None: ...
    def by_digest(self, digest: str) -> InterventionRecord | None: ...
    def history(self, tenant: str, name: str) -> tuple[list[InterventionRecord], int] | None: ...
    def list_current(self, tenant: str) -> list[InterventionRecord]: ...
    def list_public(self) -> list[InterventionRecord]: ...
    def list_names(self) -> list[tuple[str, str]]: ...
    def usage(self, tenant: str) -> tuple[int, int]:
        """(current interventions, bytes of every retained version plus the tenant's training files)."""
        ...
    def counts(self) -> tuple[int, int, int]: ...
    def read_blob(self, file_sha256: str) -> bytes:
        """The stored bytes at that address, unchecked (FileNotFoundError when absent, OSError when unreadable)."""
        ...
    def blob_addresses(self) -> set[str]: ...
    def add_version(self, request: WriteRequest, payload: bytes, make: MakeRecord) -> InterventionRecord: ...
    def set_public(self, tenant: str, name: str, public: bool) -> bool: ...
    def promote(self, tenant: str, name: str, version: int) -> InterventionRecord: ...
    def delete_version(self, tenant: str, name: str, version: int) -> None: ...
    def delete(self, tenant: str, name: str) -> bool: ...
    def gc(self) -> int: ...
    def latest(self, tenant: str, name: str) -> int: ...
    def import_name(self, versions: list[tuple[InterventionRecord, bytes]], current: int, public: bool,
                    latest: int) -> None: ...
    # training files: a put checks `quota` (None: unlimited) with `admit_file` in its own transaction
    def put_file(self, record: TrainingFileRecord, content: bytes, quota: StorageQuota | None) -> None: ...
    def file(self, tenant: str, file_id: str) -> TrainingFileRecord | None: ...
    def read_file(self, tenant: str, file_id: str) -> bytes | None: ...
    def list_files(self, tenant: str, purpose: str | None) -> list[TrainingFileRecord]:
        """Newest first (ties in the same second: the later upload first)."""
        ...
    def delete_file(self, tenant: str, file_id: str) -> bool: ...
    def close(self) -> None: ...


def admit(
    request: WriteRequest, exists: bool, usage: tuple[int, int] | None, pruned_bytes: Callable[[], int]
) -> None:
    """Raise what refuses the write, given the name's state and the tenant's (interventions, bytes) usage read in
    the write's own transaction; `pruned_bytes` gives the bytes that retention will drop (read only if needed)."""
    tenant, name, quota = request.tenant, request.name, request.quota
    if not exists and request.replace and not request.upsert:
        raise InterventionNotFoundError(name, tenant=tenant)
    if exists and not request.replace and not request.upsert:
        raise InterventionExistsError(name, tenant=tenant)
    if quota is None:
        return
    assert usage is not None
    count, used = usage
    if not exists and count >= quota.max_interventions:
        raise QuotaExceededError(f"the tenant stores {count} interventions; its limit is {quota.max_interventions}")
    after = used + request.size_bytes - pruned_bytes()
    if after > quota.max_bytes:
        raise QuotaExceededError(
            f"storing {request.size_bytes} more bytes would bring the tenant's stored versions to {after} bytes; "
            f"its limit is {quota.max_bytes} (every retained version counts, training files too: delete "
            "interventions or files to free space)"
        )


def admit_file(size_bytes: int, usage: tuple[int, int], quota: StorageQuota) -> None:
    """Raise QuotaExceededError if a training file of `size_bytes` does not fit beside the tenant's stored bytes
    (`usage`, read in the write's own transaction)."""
    used = usage[1]
    if used + size_bytes > quota.max_bytes:
        raise QuotaExceededError(
            f"storing this {size_bytes} byte file would bring the tenant's stored bytes to {used + size_bytes}; its "
            f"limit is {quota.max_bytes} (artifact versions and training files count together: delete files or "
            "interventions to free space)"
        )


def is_postgres_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def sqlite_path(location: str | Path) -> Path:
    """The directory of a local store given as a path or `sqlite:///path`."""
    if isinstance(location, Path):
        return location
    if location.startswith("sqlite://"):
        rest = location.removeprefix("sqlite://")
        if not rest.startswith("/"):
            raise StoreError(f"a sqlite store URL needs an absolute path (sqlite:///var/lib/reft), got {location!r}")
        return Path(rest)
    if "://" in location:
        raise StoreError(f"unknown store URL {location!r}: use sqlite:///path or postgresql://...")
    return Path(location)
