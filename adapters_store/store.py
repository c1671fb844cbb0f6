"""The artifact store: a SQLite index plus content-addressed artifact files under one root directory.

The store is the only writer under its root. A `put` validates the artifact completely in memory first (format,
digest, base model), writes the file atomically, and only then commits the index row, in one transaction that also
moves the name's "current" pointer: readers see the old version or the new one, never a half-written state. A
crash between the file write and the commit leaves an unreferenced file that `gc()` removes. Writers (put,
delete, gc) are serialised by one lock so gc can never remove a file a put is about to reference.

Quotas and retention: a put may carry the tenant's `StorageQuota`, checked in the same transaction as the write.
A name keeps its newest `keep_versions` versions (older ones are dropped by the put that adds a new one), and every
kept version counts against the tenant's bytes. Files that no version references any more (a delete, a dropped
version) are removed right after the commit; a crash in between leaves them to `gc()`, which the server runs at
start. A promote moves the name's current pointer back to a retained version (atomic, no new bytes); deleting one
non-current version removes its row, then its file if no other version shares it. Every read
re-checks the file's hash, so a corrupted file makes that one intervention unavailable (with the reason) and
nothing else.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from adapters_store.errors import (
    ArtifactUnavailableError,
    InterventionNotFoundError,
    StoreError,
    StoreWriteError,
)
from adapters_store.files import ArtifactFiles, sha256_hex
from adapters_store.index import Index, WriteRequest
from adapters_store.records import (
    MAX_VERSION,
    InterventionRecord,
    StorageQuota,
    validate_metadata,
    validate_name,
    validate_tenant,
)
from reft_core.artifact import Artifact, decode_artifact
from reft_core.config import check_rank
from reft_core.fingerprint import ModelFingerprint

INDEX_FILE = "index.sqlite3"
log = logging.getLogger("reft_serve.store")


@dataclass(frozen=True)
class StoreStats:
    interventions: int  # names with a current version, all tenants
    versions: int  # every stored version, all tenants
    bytes: int  # artifact bytes on disk that the index references (shared files counted once)


class ArtifactStore:
    def __init__(self, root: Path, base_model: ModelFingerprint, *, keep_versions: int | None = None) -> None:
        """`keep_versions`: newest versions kept per name (None keeps every version)."""
        assert keep_versions is None or keep_versions >= 1, keep_versions
        self.root = Path(root)
        self.base_model = base_model
        self.keep_versions = keep_versions
        self.files = ArtifactFiles(self.root)
        self._write_lock = threading.Lock()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # a read-only root that already exists still serves reads
        writable = self.root.is_dir() and os.access(self.root, os.W_OK)
        self.index = Index(self.root / INDEX_FILE, writable=writable)

    @property
    def read_only(self) -> bool:
        return self.index.read_only

    # -- reads -----------------------------------------------------------------------------------------------------
    def get(self, name: str, tenant: str = "default") -> InterventionRecord:
        """The current version of `name` (raises InterventionNotFoundError)."""
        record = self.index.current(validate_tenant(tenant), validate_name(name))
        if record is None:
            raise InterventionNotFoundError(name, tenant=tenant)
        return record

    def get_version(self, name: str, version: int, tenant: str = "default") -> InterventionRecord:
        """One retained version of `name` (raises InterventionNotFoundError, also for numbers out of range)."""
        validate_tenant(tenant)
        validate_name(name)
        record = self.index.version(tenant, name, version) if _in_range(version) else None
        if record is None:
            raise InterventionNotFoundError(name, version, tenant=tenant)
        return record

    def versions(self, name: str, tenant: str = "default") -> tuple[list[InterventionRecord], int]:
        """Every retained version of `name`, newest first, and the current version's number."""
        found = self.index.history(validate_tenant(tenant), validate_name(name))
        if found is None:
            raise InterventionNotFoundError(name, tenant=tenant)
        return found

    def list(self, tenant: str = "default") -> list[InterventionRecord]:
        """Current versions, sorted by name."""
        return self.index.list_current(validate_tenant(tenant))

    def list_public(self) -> list[InterventionRecord]:
        return self.index.list_public()

    def usage(self, tenant: str) -> tuple[int, int]:
        """(interventions, bytes of every retained version) stored by `tenant`: what its quota counts."""
        return self.index.usage(validate_tenant(tenant))

    def set_public(self, name: str, public: bool, tenant: str = "default") -> InterventionRecord:
        self._check_writable()
        if not self.index.set_public(validate_tenant(tenant), validate_name(name), public):
            raise InterventionNotFoundError(name, tenant=tenant)
        return self.get(name, tenant)

    def read_artifact(self, record: InterventionRecord) -> bytes:
        """The artifact's bytes, checked against the hash recorded at put time."""
        what = f"artifact of '{record.name}' v{record.version}"
        try:
            payload = self.files.read(record.file_sha256)
        except FileNotFoundError:
            raise ArtifactUnavailableError(f"{what} is unavailable: file missing") from None
        except OSError as exc:
            raise ArtifactUnavailableError(f"{what} is unavailable: unreadable ({exc.strerror})") from None
        if sha256_hex(payload) != record.file_sha256:
            raise ArtifactUnavailableError(f"{what} is unavailable: corrupt on disk: digest mismatch")
        return payload

    def load(self, record: InterventionRecord) -> Artifact:
        return decode_artifact(self.read_artifact(record), base_model=self.base_model)

    def load_digest(self, digest: str) -> Artifact:
        """The artifact with this content digest, whichever name and version holds it (for engines that are handed
        a digest, not a name: Ray Serve replicas). Raises ArtifactUnavailableError when no version has it (deleted
        since it was resolved)."""
        record = self.index.by_digest(digest)
        if record is None:
            raise ArtifactUnavailableError(f"no stored version has the artifact {digest} (deleted meanwhile?)")
        return self.load(record)

    def stats(self) -> StoreStats:
        interventions, versions, size = self.index.counts()
        return StoreStats(interventions=interventions, versions=versions, bytes=size)

    # -- writes ----------------------------------------------------------------------------------------------------
    def put(
        self,
        name: str,
        payload: bytes,
        *,
        tenant: str = "default",
        description: str | None = "",
        tags: Iterable[str] = (),
        source: str = "upload",
        replace: bool = False,
        upsert: bool = False,
        quota: StorageQuota | None = None,
        max_rank: int | None = None,
    ) -> InterventionRecord:
        """Validate and store an artifact as `name`: a new name, or (with `replace`) its next current version, or
        (with `upsert`) either. `description=None` keeps the current version's description (a PUT that does not
        give one), read in the write's own transaction.

        With a `quota`, the tenant's interventions and retained bytes after the write must fit it, or the put raises
        QuotaExceededError and stores nothing. With `max_rank`, a higher-rank artifact raises RankLimitError.
        """
        validate_name(name)
        validate_tenant(tenant)
        tag_tuple = validate_metadata(description or "", tags, source)
        artifact = decode_artifact(payload, base_model=self.base_model)  # in memory, before touching disk
        if max_rank is not None:
            check_rank(artifact.intervention.config.rank, artifact.intervention.hidden_size, max_rank)
        self._check_writable()
        request = WriteRequest(tenant, name, replace, len(payload), quota, self.keep_versions, upsert)
        with self._write_lock, self._writing():
            # checked again inside the transaction (another process may write); checking first avoids writing a
            # file only to refuse it
            self.index.check_write(request)
            file_sha256 = self.files.write(payload)
            created_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")

            def make(version: int, previous: InterventionRecord | None) -> InterventionRecord:
                kept = previous.description if description is None and previous is not None else description
                return InterventionRecord(
                    name=name, version=version, tenant=tenant, digest=artifact.digest, file_sha256=file_sha256,
                    size_bytes=len(payload), base_model_id=artifact.base_model.id,
                    config=artifact.intervention.config.to_dict(), created_at=created_at, source=source,
                    description=kept or "", tags=tag_tuple, training=dict(artifact.training),
                )

            try:
                record, dropped = self.index.add_version(request, make)
            except StoreError:  # refused in the transaction: the file just written may be referenced by nothing
                self._collect({file_sha256})
                raise
            self._collect(dropped)
            return record

    def delete(self, name: str, tenant: str = "default") -> None:
        """Remove every version from the index, then the files no other version references."""
        validate_name(name)
        validate_tenant(tenant)
        self._check_writable()
        with self._write_lock, self._writing():
            files = self.index.delete(tenant, name)
            if files is None:
                raise InterventionNotFoundError(name, tenant=tenant)
            self._collect(files)

    def promote(self, name: str, version: int, tenant: str = "default") -> InterventionRecord:
        """Make a retained version current again (one pointer update; requests already running keep theirs)."""
        self._check_version_write(name, version, tenant)
        with self._write_lock, self._writing():
            return self.index.promote(tenant, name, version)

    def delete_version(self, name: str, version: int, tenant: str = "default") -> None:
        """Remove one non-current version (VersionIsCurrentError for the current one), then its file if unshared."""
        self._check_version_write(name, version, tenant)
        with self._write_lock, self._writing():
            self._collect(self.index.delete_version(tenant, name, version))

    def _check_version_write(self, name: str, version: int, tenant: str) -> None:
        """What a write to one version needs before taking the lock: valid names, a version that can exist (an
        out-of-range number is simply not found), and a writable store."""
        validate_name(name)
        validate_tenant(tenant)
        if not _in_range(version):
            raise InterventionNotFoundError(name, version, tenant=tenant)
        self._check_writable()

    def gc(self) -> int:
        """Remove artifact files no record references, and temp files of interrupted writes; return the count."""
        self._check_writable()
        with self._write_lock, self._writing():  # no put is between its file write and its commit meanwhile
            referenced = self.index.referenced_files()
            stale = [path for path in self.files.all_files() if path.stem not in referenced]
            stale += self.files.temp_files()
            for path in stale:
                path.unlink(missing_ok=True)
        return len(stale)

    def close(self) -> None:
        self.index.close()

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _collect(self, candidates: set[str]) -> None:
        """Remove the candidate files no version references. Caller holds the write lock; the index change is
        already committed, so a failure here only leaves files for the next `gc()` instead of failing the write."""
        for file_sha256 in candidates - self.index.referenced_files(among=candidates):
            try:
                self.files.path_for(file_sha256).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove an unreferenced artifact file", extra={"file": file_sha256,
                                                                                       "reason": str(exc)})

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreWriteError(f"the store at {self.root} is read-only: serving works, writes are refused")

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Turn OS and SQLite write failures into StoreWriteError; the caller's state is unchanged by then."""
        try:
            yield
        except (OSError, sqlite3.OperationalError) as exc:
            full = getattr(exc, "errno", None) == errno.ENOSPC or "full" in str(exc)
            reason = "disk full" if full else str(exc)
            message = f"could not write to the store at {self.root} ({reason}); nothing stored was changed"
            raise StoreWriteError(message) from exc


def _in_range(version: int) -> bool:
    return isinstance(version, int) and not isinstance(version, bool) and 1 <= version <= MAX_VERSION
