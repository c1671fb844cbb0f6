"""The artifact store: validated interventions with their version history, on a backend chosen by URL.

`ArtifactStore` is what the server calls. A `put` validates the artifact completely in memory first (format,
digest, base model, rank) and builds its record; the backend then stores bytes and record in one transaction that
also checks the tenant's quota and moves the name's "current" pointer: readers see the old version or the new one,
never a half-written state. Backends: a directory (SQLite index plus content-addressed files, `adapters_store.local`;
the default) or `postgresql://...` (everything in one database, `adapters_store.postgres`), for several replicas.

Quotas and retention: a put may carry the tenant's `StorageQuota`, checked in the same transaction as the write.
A name keeps its newest `keep_versions` versions (older ones are dropped by the put that adds a new one), and every
kept version counts against the tenant's bytes. A promote moves the name's current pointer back to a retained
version (atomic, no new bytes); deleting one non-current version removes its row, then its bytes if no other
version shares them. Every read re-checks the bytes' hash, so a corrupted artifact makes that one intervention
unavailable (with the reason) and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from adapters_store.backend import StoreBackend, WriteRequest, is_postgres_url, sqlite_path
from adapters_store.errors import ArtifactUnavailableError, InterventionNotFoundError, StoreWriteError
from adapters_store.files import ArtifactFiles, sha256_hex
from adapters_store.jobs import JobResult
from adapters_store.index import Index
from adapters_store.local import LocalBackend
from adapters_store.records import (
    MAX_VERSION,
    InterventionRecord,
    StorageQuota,
    validate_metadata,
    validate_name,
    validate_tenant,
)
from adapters_store.training_files import TrainingFileStore
from reft_core.artifact import Artifact, decode_artifact
from reft_core.config import check_rank
from reft_core.fingerprint import ModelFingerprint



@dataclass(frozen=True)
class StoreStats:
    interventions: int  # names with a current version, all tenants
    versions: int  # every stored version, all tenants
    bytes: int  # artifact bytes on disk that the index references (shared files counted once)


class ArtifactStore:
    def __init__(
        self, location: Path | str, base_model: ModelFingerprint, *, keep_versions: int | None = None
    ) -> None:
        """`location`: a directory, `sqlite:///dir`, or `postgresql://...`. `keep_versions`: newest versions kept
        per name (None keeps every version)."""
        assert keep_versions is None or keep_versions >= 1, keep_versions
        self.base_model = base_model
        self.keep_versions = keep_versions
        self.backend: StoreBackend
        if is_postgres_url(location):
            from adapters_store.postgres.artifacts import PostgresBackend  # psycopg is an optional dependency

            self.backend = PostgresBackend(str(location))
        else:
            self.backend = LocalBackend(sqlite_path(location))
        self.training_files = TrainingFileStore(self.backend)  # fine-tuning uploads, on the backend, same quota

    @property
    def read_only(self) -> bool:
        return self.backend.read_only

    @property
    def root(self) -> Path:
        """The directory of a local store (tests and tools that look at its files)."""
        assert isinstance(self.backend, LocalBackend), "only a local store has a root directory"
        return self.backend.root

    @property
    def index(self) -> Index:
        assert isinstance(self.backend, LocalBackend), "only a local store has a SQLite index"
        return self.backend.index

    @property
    def files(self) -> ArtifactFiles:
        assert isinstance(self.backend, LocalBackend), "only a local store keeps artifact files"
        return self.backend.files

    # -- reads -----------------------------------------------------------------------------------------------------
    def get(self, name: str, tenant: str = "default") -> InterventionRecord:
        """The current version of `name` (raises InterventionNotFoundError)."""
        record = self.backend.current(validate_tenant(tenant), validate_name(name))
        if record is None:
            raise InterventionNotFoundError(name, tenant=tenant)
        return record

    def get_version(self, name: str, version: int, tenant: str = "default") -> InterventionRecord:
        """One retained version of `name` (raises InterventionNotFoundError, also for numbers out of range)."""
        validate_tenant(tenant)
        validate_name(name)
        record = self.backend.version(tenant, name, version) if _in_range(version) else None
        if record is None:
            raise InterventionNotFoundError(name, version, tenant=tenant)
        return record

    def versions(self, name: str, tenant: str = "default") -> tuple[list[InterventionRecord], int]:
        """Every retained version of `name`, newest first, and the current version's number."""
        found = self.backend.history(validate_tenant(tenant), validate_name(name))
        if found is None:
            raise InterventionNotFoundError(name, tenant=tenant)
        return found

    def list(self, tenant: str = "default") -> list[InterventionRecord]:
        """Current versions, sorted by name."""
        return self.backend.list_current(validate_tenant(tenant))

    def list_public(self) -> list[InterventionRecord]:
        return self.backend.list_public()

    def usage(self, tenant: str) -> tuple[int, int]:
        """(interventions, bytes of every retained version and training file) stored by `tenant`: what its quota
        counts."""
        return self.backend.usage(validate_tenant(tenant))

    def set_public(self, name: str, public: bool, tenant: str = "default") -> InterventionRecord:
        self._check_writable()
        if not self.backend.set_public(validate_tenant(tenant), validate_name(name), public):
            raise InterventionNotFoundError(name, tenant=tenant)
        return self.get(name, tenant)

    def read_artifact(self, record: InterventionRecord) -> bytes:
        """The artifact's bytes, checked against the hash recorded at put time."""
        what = f"artifact of '{record.name}' v{record.version}"
        try:
            payload = self.backend.read_blob(record.file_sha256)
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
        record = self.backend.by_digest(digest)
        if record is None:
            raise ArtifactUnavailableError(f"no stored version has the artifact {digest} (deleted meanwhile?)")
        return self.load(record)

    def stats(self) -> StoreStats:
        interventions, versions, size = self.backend.counts()
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
        job: JobResult | None = None,
    ) -> InterventionRecord:
        """Validate and store an artifact as `name`: a new name, or (with `replace`) its next current version, or
        (with `upsert`) either. `description=None` keeps the current version's description (a PUT that does not
        give one), read in the write's own transaction.

        With a `quota`, the tenant's interventions and retained bytes after the write must fit it, or the put raises
        QuotaExceededError and stores nothing. With `max_rank`, a higher-rank artifact raises RankLimitError. `job`:
        the training job whose result this is; its id is recorded with the version (`training["job_id"]`, in the
        record only: the artifact and its digest stay what the training produced), see `JobResult`.
        """
        validate_name(name)
        validate_tenant(tenant)
        tag_tuple = validate_metadata(description or "", tags, source)
        artifact = decode_artifact(payload, base_model=self.base_model)  # in memory, before touching disk
        if max_rank is not None:
            check_rank(artifact.intervention.config.rank, artifact.intervention.hidden_size, max_rank)
        self._check_writable()
        request = WriteRequest(tenant, name, replace, len(payload), quota, self.keep_versions, upsert, job)
        file_sha256 = sha256_hex(payload)
        created_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")

        def make(version: int, previous: InterventionRecord | None) -> InterventionRecord:
            kept = previous.description if description is None and previous is not None else description
            return InterventionRecord(
                name=name, version=version, tenant=tenant, digest=artifact.digest, file_sha256=file_sha256,
                size_bytes=len(payload), base_model_id=artifact.base_model.id,
                config=artifact.intervention.config.to_dict(), created_at=created_at, source=source,
                description=kept or "", tags=tag_tuple,
                training=dict(artifact.training) | ({"job_id": job.job_id} if job is not None else {}),
            )

        return self.backend.add_version(request, payload, make)

    def delete(self, name: str, tenant: str = "default") -> None:
        """Remove every version, then the bytes no other version references."""
        validate_name(name)
        validate_tenant(tenant)
        self._check_writable()
        if not self.backend.delete(tenant, name):
            raise InterventionNotFoundError(name, tenant=tenant)

    def promote(self, name: str, version: int, tenant: str = "default") -> InterventionRecord:
        """Make a retained version current again (one pointer update; requests already running keep theirs)."""
        self._check_version_write(name, version, tenant)
        return self.backend.promote(tenant, name, version)

    def delete_version(self, name: str, version: int, tenant: str = "default") -> None:
        """Remove one non-current version (VersionIsCurrentError for the current one), then its bytes if unshared."""
        self._check_version_write(name, version, tenant)
        self.backend.delete_version(tenant, name, version)

    def _check_version_write(self, name: str, version: int, tenant: str) -> None:
        """What a write to one version needs before taking the lock: valid names, a version that can exist (an
        out-of-range number is simply not found), and a writable store."""
        validate_name(name)
        validate_tenant(tenant)
        if not _in_range(version):
            raise InterventionNotFoundError(name, version, tenant=tenant)
        self._check_writable()

    def gc(self) -> int:
        """Remove stored bytes no record references (and temp files of interrupted writes); return the count."""
        self._check_writable()
        return self.backend.gc()

    def blob_addresses(self) -> set[str]:
        """The sha256 of every stored artifact, referenced or not (what gc and migrations look at)."""
        return self.backend.blob_addresses()

    def list_names(self) -> list[tuple[str, str]]:
        """(tenant, name) of every intervention, all tenants."""
        return self.backend.list_names()

    def subscribe(self, on_change: Callable[[str, str], None], on_reset: Callable[[], None]) -> bool:
        """Hear of other processes' writes: `on_change(tenant, name)` per changed name, `on_reset()` when changes
        may have been missed. False when the backend has no other writers to hear of (the local store)."""
        subscribe = getattr(self.backend, "subscribe", None)
        if subscribe is None:
            return False
        subscribe(on_change, on_reset)
        return True

    def close(self) -> None:
        self.backend.close()

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreWriteError(f"the store at {self.backend.location} is read-only: serving works, writes are refused")


def _in_range(version: int) -> bool:
    return isinstance(version, int) and not isinstance(version, bool) and 1 <= version <= MAX_VERSION
