"""Uploaded training files (OpenAI's `/v1/files`, purpose `fine-tune`): the `training_files` table of the index.

This module owns that table and all its SQL; the index database owns the connection. A file's bytes live in the
row (files are small: examples for one persona, capped by the server's `max_file_bytes`), so a put is one
transaction: the tenant's storage quota (artifact versions and training files together) is checked and the row
written in it, and concurrent uploads cannot together overshoot it. The API is narrow on purpose (put, get, read,
list, delete) so that another backend can provide the same. Files belong to a tenant: every method takes it, and
another tenant's file is `TrainingFileNotFoundError`, exactly like one that does not exist.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from adapters_store.errors import (
    InvalidMetadataError,
    QuotaExceededError,
    StoreWriteError,
    TrainingFileNotFoundError,
    write_errors,
)
from adapters_store.index import Index
from adapters_store.records import StorageQuota, validate_tenant

PURPOSES = ("fine-tune",)
MAX_FILENAME_CHARS = 255
_COLUMNS = "id, tenant, filename, purpose, size_bytes, created_at"


@dataclass(frozen=True)
class TrainingFileRecord:
    id: str  # "file-<24 hex>"
    tenant: str
    filename: str
    purpose: str
    size_bytes: int
    created_at: int  # unix seconds, as OpenAI's file objects have it


class TrainingFileStore:
    def __init__(self, index: Index, where: str) -> None:
        self._index = index
        self._where = where  # the store's root, for error messages

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
        with write_errors(self._where), self._index.transaction() as db:
            if quota is not None:
                _, used = self._index.usage_in(db, tenant)
                if used + len(content) > quota.max_bytes:
                    raise QuotaExceededError(
                        f"storing this {len(content)} byte file would bring the tenant's stored bytes to "
                        f"{used + len(content)}; its limit is {quota.max_bytes} (artifact versions and training "
                        "files count together: delete files or interventions to free space)")
            db.execute(f"INSERT INTO training_files ({_COLUMNS}, content) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (record.id, tenant, filename, purpose, record.size_bytes, record.created_at, content))
        return record

    def get(self, tenant: str, file_id: str) -> TrainingFileRecord:
        with self._index.reading() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM training_files WHERE tenant=? AND id=?",
                             (tenant, file_id)).fetchone()
        if row is None:
            raise TrainingFileNotFoundError(file_id)
        return TrainingFileRecord(*row)

    def read(self, tenant: str, file_id: str) -> bytes:
        """The file's content."""
        with self._index.reading() as db:
            row = db.execute("SELECT content FROM training_files WHERE tenant=? AND id=?", (tenant, file_id)).fetchone()
        if row is None:
            raise TrainingFileNotFoundError(file_id)
        return bytes(row[0])

    def list(self, tenant: str, purpose: str | None = None) -> list[TrainingFileRecord]:
        """The tenant's files, newest first (ties in the same second: the later upload first)."""
        query = f"SELECT {_COLUMNS} FROM training_files WHERE tenant=?"
        params: tuple[str, ...] = (tenant,)
        if purpose is not None:
            query, params = query + " AND purpose=?", (tenant, purpose)
        with self._index.reading() as db:
            rows = db.execute(query + " ORDER BY created_at DESC, rowid DESC", params).fetchall()
        return [TrainingFileRecord(*row) for row in rows]

    def delete(self, tenant: str, file_id: str) -> None:
        self._check_writable()
        with write_errors(self._where), self._index.transaction() as db:
            if not db.execute("DELETE FROM training_files WHERE tenant=? AND id=?", (tenant, file_id)).rowcount:
                raise TrainingFileNotFoundError(file_id)

    def _check_writable(self) -> None:
        if self._index.read_only:
            raise StoreWriteError(f"the store at {self._where} is read-only: serving works, writes are refused")
