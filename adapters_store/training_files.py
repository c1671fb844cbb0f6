"""Uploaded training files (OpenAI's `/v1/files`, purpose `fine-tune`): validation and ids, over the store backend.

The backend (`StoreBackend.put_file` ... `delete_file`: a table of the SQLite index, or of the PostgreSQL database)
keeps each file's bytes in its row (files are small: examples for one persona, capped by the server's
`max_file_bytes`), so a put is one transaction: the tenant's storage quota (artifact versions and training files
together) is checked and the row written in it, and concurrent uploads cannot together overshoot it. The API is
narrow on purpose (put, get, read, list, delete). Files belong to a tenant: every method takes it, and another
tenant's file is `TrainingFileNotFoundError`, exactly like one that does not exist.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

from adapters_store.errors import InvalidMetadataError, StoreWriteError, TrainingFileNotFoundError
from adapters_store.records import StorageQuota, TrainingFileRecord, validate_tenant

if TYPE_CHECKING:
    from adapters_store.backend import StoreBackend

PURPOSES = ("fine-tune",)
MAX_FILENAME_CHARS = 255


class TrainingFileStore:
    def __init__(self, backend: StoreBackend) -> None:
        self._backend = backend

    def put(
        self, tenant: str, filename: str, purpose: str, content: bytes, quota: StorageQuota | None = None
    ) -> TrainingFileRecord:
        """Store `content` as a new file of `tenant`; QuotaExceededError (nothing stored) if it does not fit."""
        validate_tenant(tenant)
        if purpose not in PURPOSES:
            raise InvalidMetadataError(f"purpose {purpose!r:.40} must be one of {list(PURPOSES)}")
        if not filename or len(filename) > MAX_FILENAME_CHARS or not filename.isprintable():
            raise InvalidMetadataError(f"filename must be 1-{MAX_FILENAME_CHARS} printable characters")
        self._check_writable()
        record = TrainingFileRecord(f"file-{uuid.uuid4().hex[:24]}", tenant, filename, purpose, len(content),
                                    int(time.time()))
        self._backend.put_file(record, content, quota)
        return record

    def get(self, tenant: str, file_id: str) -> TrainingFileRecord:
        record = self._backend.file(tenant, file_id)
        if record is None:
            raise TrainingFileNotFoundError(file_id)
        return record

    def read(self, tenant: str, file_id: str) -> bytes:
        """The file's content."""
        content = self._backend.read_file(tenant, file_id)
        if content is None:
            raise TrainingFileNotFoundError(file_id)
        return content

    def list(self, tenant: str, purpose: str | None = None) -> list[TrainingFileRecord]:
        """The tenant's files, newest first (ties in the same second: the later upload first)."""
        return self._backend.list_files(tenant, purpose)

    def delete(self, tenant: str, file_id: str) -> None:
        self._check_writable()
        if not self._backend.delete_file(tenant, file_id):
            raise TrainingFileNotFoundError(file_id)

    def _check_writable(self) -> None:
        if self._backend.read_only:
            raise StoreWriteError(
                f"the store at {self._backend.location} is read-only: serving works, writes are refused")
