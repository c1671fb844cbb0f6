"""Tenants and their API keys (SQLite, `<root>/tenants.sqlite3`).

A key is shown once, when it is created, and never stored: the table keeps its id and the SHA-256 of its secret.
Keys are 256-bit random secrets, so a fast hash is the right tool (a slow password hash protects low-entropy
passwords; it would only add latency to every request here). A presented key `rs-<id>.<secret>` is looked up by
its id and its secret's hash compared in constant time, so response timing says nothing about stored hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapters_store.errors import InvalidNameError, StoreError, StoreWriteError
from adapters_store.records import validate_tenant
from adapters_store.sqlite_db import open_database

KEY_PREFIX = "rs-"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (name TEXT PRIMARY KEY, created_at REAL NOT NULL, limits TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants(name), secret_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL, revoked_at REAL
);
"""


class TenantNotFoundError(StoreError):
    def __init__(self, tenant: str) -> None:
        super().__init__(f"tenant '{tenant}' does not exist")


class TenantExistsError(StoreError):
    def __init__(self, tenant: str) -> None:
        super().__init__(f"tenant '{tenant}' already exists")


class KeyNotFoundError(StoreError):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"API key '{key_id}' does not exist")


@dataclass(frozen=True)
class Tenant:
    name: str
    created_at: float
    limits: dict[str, Any] = field(default_factory=dict)  # per-tenant overrides of the server's quota settings

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant: str
    created_at: float
    revoked_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def key_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(key: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    if not key.startswith(KEY_PREFIX) or "." not in key:
        return None
    key_id, _, secret = key[len(KEY_PREFIX):].partition(".")
    return (key_id, secret) if key_id and secret else None


class TenantStore:
    def __init__(self, root: Path) -> None:
        self._db, self.read_only = open_database(Path(root) / "tenants.sqlite3", _SCHEMA)
        self._lock = threading.Lock()

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreWriteError("the data directory is read-only: tenants and keys cannot change")

    # -- tenants ---------------------------------------------------------------------------------------------------
    def create_tenant(self, name: str, limits: dict[str, Any] | None = None) -> Tenant:
        tenant = Tenant(validate_tenant(name), time.time(), dict(limits or {}))
        self._check_writable()
        with self._lock:
            try:
                self._db.execute("INSERT INTO tenants VALUES (?, ?, ?)", (name, tenant.created_at, json.dumps(tenant.limits)))
            except sqlite3.IntegrityError:
                raise TenantExistsError(name) from None
        return tenant

    def get_tenant(self, name: str) -> Tenant:
        with self._lock:
            row = self._db.execute("SELECT name, created_at, limits FROM tenants WHERE name=?", (name,)).fetchone()
        if row is None:
            raise TenantNotFoundError(name)
        return Tenant(row[0], row[1], json.loads(row[2]))

    def list_tenants(self) -> list[Tenant]:
        with self._lock:
            rows = self._db.execute("SELECT name, created_at, limits FROM tenants ORDER BY name").fetchall()
        return [Tenant(r[0], r[1], json.loads(r[2])) for r in rows]

    def set_limits(self, name: str, limits: dict[str, Any]) -> Tenant:
        self._check_writable()
        with self._lock:
            updated = self._db.execute("UPDATE tenants SET limits=? WHERE name=?", (json.dumps(limits), name)).rowcount
        if not updated:
            raise TenantNotFoundError(name)
        return self.get_tenant(name)

    # -- keys ------------------------------------------------------------------------------------------------------
    def create_key(self, tenant: str) -> tuple[ApiKey, str]:
        """A new key for `tenant`: the record and the key itself (shown to the caller once, never stored)."""
        self.get_tenant(tenant)
        self._check_writable()
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        record = ApiKey(key_id, tenant, time.time())
        with self._lock:
            self._db.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, NULL)",
                             (key_id, tenant, key_digest(secret), record.created_at))
        return record, f"{KEY_PREFIX}{key_id}.{secret}"

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        query = "SELECT id, tenant, created_at, revoked_at FROM api_keys"
        with self._lock:
            if tenant is None:
                rows = self._db.execute(f"{query} ORDER BY created_at").fetchall()
            else:
                rows = self._db.execute(f"{query} WHERE tenant=? ORDER BY created_at", (tenant,)).fetchall()
        return [ApiKey(*row) for row in rows]

    def revoke_key(self, key_id: str) -> ApiKey:
        self._check_writable()
        with self._lock:
            updated = self._db.execute("UPDATE api_keys SET revoked_at=? WHERE id=? AND revoked_at IS NULL",
                                       (time.time(), key_id)).rowcount
            row = self._db.execute("SELECT id, tenant, created_at, revoked_at FROM api_keys WHERE id=?",
                                   (key_id,)).fetchone()
        if row is None:
            raise KeyNotFoundError(key_id)
        del updated  # revoking twice is harmless: the key stays revoked
        return ApiKey(*row)

    def key_hashes(self) -> list[tuple[str, str, float, float | None, str]]:
        """(id, tenant, created_at, revoked_at, secret_sha256) of every key: what a migration copies."""
        with self._lock:
            return [tuple(r) for r in self._db.execute(  # type: ignore[misc]
                "SELECT id, tenant, created_at, revoked_at, secret_sha256 FROM api_keys").fetchall()]

    def import_tenant(self, tenant: Tenant) -> None:
        self._check_writable()
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO tenants VALUES (?, ?, ?)",
                             (tenant.name, tenant.created_at, json.dumps(tenant.limits)))

    def import_key(self, key: ApiKey, secret_sha256: str) -> None:
        self._check_writable()
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO api_keys VALUES (?, ?, ?, ?, ?)",
                             (key.id, key.tenant, secret_sha256, key.created_at, key.revoked_at))

    def authenticate(self, key: str) -> str | None:
        """The tenant a presented key belongs to, or None (unknown, malformed or revoked)."""
        parts = split_key(key)
        if parts is None:
            return None
        key_id, secret = parts
        with self._lock:
            row = self._db.execute("SELECT tenant, secret_sha256 FROM api_keys WHERE id=? AND revoked_at IS NULL",
                                   (key_id,)).fetchone()
        presented = key_digest(secret)
        stored = row[1] if row is not None else key_digest("")  # compare anyway: same work for unknown ids
        return row[0] if hmac.compare_digest(presented, stored) and row is not None else None

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_tenants(location: Path | str) -> TenantStore:
    """Tenants at a data directory, or in the PostgreSQL database of a `postgresql://` store URL."""
    from adapters_store.backend import is_postgres_url, sqlite_path

    if is_postgres_url(location):
        from adapters_store.postgres.tenants import PostgresTenantStore

        return PostgresTenantStore(str(location))  # type: ignore[return-value]  # same methods, duck-typed
    return TenantStore(sqlite_path(location))


__all__ = ["ApiKey", "InvalidNameError", "KeyNotFoundError", "Tenant", "TenantExistsError", "TenantNotFoundError",
           "TenantStore", "split_key"]
