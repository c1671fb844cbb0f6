"""The embedded backend: a SQLite index plus content-addressed artifact files under one root directory.

The backend is the only writer under its root. A write stores the file atomically first and only then commits the
index row, in one transaction that also checks the quota and moves the name's "current" pointer: readers see the
old version or the new one, never a half-written state. A crash between the file write and the commit leaves an
unreferenced file that `gc()` removes. Writers (put, delete, gc) are serialised by one lock so gc can never remove
a file a put is about to reference. Files that no version references any more (a delete, a dropped version) are
removed right after the commit; a crash in between leaves them to `gc()`, which the server runs at start.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import AbstractContextManager
from pathlib import Path

from adapters_store.backend import MakeRecord, WriteRequest
from adapters_store.errors import StoreError, write_errors
from adapters_store.files import ArtifactFiles
from adapters_store.index import Index
from adapters_store.records import InterventionRecord, StorageQuota, TrainingFileRecord

INDEX_FILE = "index.sqlite3"
log = logging.getLogger("reft_serve.store")


class LocalBackend:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.location = str(self.root)
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

    # -- reads: the index answers --------------------------------------------------------------------------------
    def current(self, tenant: str, name: str) -> InterventionRecord | None:
        return self.index.current(tenant, name)

    def version(self, tenant: str, name: str, version: int) -> InterventionRecord | None:
        return self.index.version(tenant, name, version)

    def by_digest(self, digest: str) -> InterventionRecord | None:
        return self.index.by_digest(digest)

    def history(self, tenant: str, name: str) -> tuple[list[InterventionRecord], int] | None:
        return self.index.history(tenant, name)

    def list_current(self, tenant: str, after: str = "", limit: int | None = None) -> list[InterventionRecord]:
        return self.index.list_current(tenant, after, limit)

    def list_public(self, after: tuple[str, str] = ("", ""), limit: int | None = None,
                    exclude: str = "") -> list[InterventionRecord]:
        return self.index.list_public(after, limit, exclude)

    def list_names(self) -> list[tuple[str, str]]:
        return self.index.list_names()

    def visible_names(self, tenant: str, prefix: str, limit: int) -> list[str]:
        return self.index.visible_names(tenant, prefix, limit)

    def usage(self, tenant: str) -> tuple[int, int]:
        return self.index.usage(tenant)

    def counts(self) -> tuple[int, int, int]:
        return self.index.counts()

    def read_blob(self, file_sha256: str) -> bytes:
        return self.files.read(file_sha256)

    def blob_addresses(self) -> set[str]:
        return {path.stem for path in self.files.all_files()}

    # -- writes ----------------------------------------------------------------------------------------------------
    def add_version(self, request: WriteRequest, payload: bytes, make: MakeRecord) -> InterventionRecord:
        with self._write_lock, self._writing():
            # checked again inside the transaction (another process may write); checking first avoids writing a
            # file only to refuse it
            self.index.check_write(request)
            file_sha256 = self.files.write(payload)
            try:
                record, dropped = self.index.add_version(request, make)
            except StoreError:  # refused in the transaction: the file just written may be referenced by nothing
                self._collect({file_sha256})
                raise
            assert record.file_sha256 == file_sha256, (record.file_sha256, file_sha256)
            self._collect(dropped)
            return record

    def set_public(self, tenant: str, name: str, public: bool) -> bool:
        with self._writing():
            return self.index.set_public(tenant, name, public)

    def promote(self, tenant: str, name: str, version: int) -> InterventionRecord:
        with self._write_lock, self._writing():
            return self.index.promote(tenant, name, version)

    def delete_version(self, tenant: str, name: str, version: int) -> None:
        with self._write_lock, self._writing():
            self._collect(self.index.delete_version(tenant, name, version))

    def delete(self, tenant: str, name: str) -> bool:
        """Remove every version from the index, then the files no other version references."""
        with self._write_lock, self._writing():
            files = self.index.delete(tenant, name)
            if files is None:
                return False
            self._collect(files)
            return True

    def gc(self) -> int:
        """Remove artifact files no record references, and temp files of interrupted writes; return the count."""
        with self._write_lock, self._writing():  # no put is between its file write and its commit meanwhile
            referenced = self.index.referenced_files()
            stale = [path for path in self.files.all_files() if path.stem not in referenced]
            stale += self.files.temp_files()
            for path in stale:
                path.unlink(missing_ok=True)
        return len(stale)

    def latest(self, tenant: str, name: str) -> int:
        return self.index.latest(tenant, name)

    def import_name(self, versions: list[tuple[InterventionRecord, bytes]], current: int, public: bool,
                    latest: int) -> None:
        with self._write_lock, self._writing():
            for record, payload in versions:
                assert self.files.write(payload) == record.file_sha256
            self.index.import_name([record for record, _ in versions], current, public, latest)

    # -- training files: rows of the index (bytes included), so the quota check shares the write's transaction ----
    def put_file(self, record: TrainingFileRecord, content: bytes, quota: StorageQuota | None) -> None:
        with self._writing():
            self.index.put_file(record, content, quota)

    def file(self, tenant: str, file_id: str) -> TrainingFileRecord | None:
        return self.index.file(tenant, file_id)

    def read_file(self, tenant: str, file_id: str) -> bytes | None:
        return self.index.read_file(tenant, file_id)

    def list_files(self, tenant: str, purpose: str | None) -> list[TrainingFileRecord]:
        return self.index.list_files(tenant, purpose)

    def delete_file(self, tenant: str, file_id: str) -> bool:
        with self._writing():
            return self.index.delete_file(tenant, file_id)

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

    def _writing(self) -> AbstractContextManager[None]:
        return write_errors(self.location)
