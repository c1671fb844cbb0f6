"""Tenants and API keys on PostgreSQL: the same rules as `adapters_store.tenants` (keys stored as hashes of their
secrets, compared in constant time), shared by every replica. A revoked key is refused by every replica at its
next request: authentication reads the key's row each time (one indexed lookup).

While the database is unreachable (a restart), a key this process accepted before, and its tenant's limits, keep
their last answer, so clients with cached personas keep generating; nothing can be revoked meanwhile anyway, and
the first answer after the database is back replaces it. Keys never seen are refused with 503 in that time."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import OrderedDict
from typing import Any

import psycopg

from adapters_store.errors import StoreUnavailableError
from adapters_store.postgres.db import Database
from adapters_store.records import validate_tenant
from adapters_store.tenants import (
    KEY_PREFIX,
    ApiKey,
    KeyNotFoundError,
    Tenant,
    TenantExistsError,
    TenantNotFoundError,
    key_digest,
    split_key,
)

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE tenants (name TEXT PRIMARY KEY, created_at DOUBLE PRECISION NOT NULL, limits TEXT NOT NULL)",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants(name), secret_sha256 TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION)""",
        "CREATE INDEX api_keys_tenant ON api_keys (tenant)",
    ),
)
_KEY_COLUMNS = "id, tenant, created_at, revoked_at"
_REMEMBERED = 10_000  # keys (and tenants) whose last answer is kept for outages


class LastAnswers:
    """A bounded map from a key's hash (or a tenant's name) to the last answer the database gave for it."""

    def __init__(self) -> None:
        self._answers: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, key: str, answer: Any) -> None:
        with self._lock:
            self._answers[key] = answer
            self._answers.move_to_end(key)
            while len(self._answers) > _REMEMBERED:
                self._answers.popitem(last=False)

    def forget(self, key: str) -> None:
        with self._lock:
            self._answers.pop(key, None)

    def recall(self, key: str) -> Any:
        with self._lock:
            return self._answers.get(key)


class PostgresTenantStore:
    read_only = False

    def __init__(self, url: str) -> None:
        self.db = Database(url, max_connections=4)
        self._keys, self._tenants = LastAnswers(), LastAnswers()  # for outages only (see the module's docstring)
        try:
            self.db.migrate("tenants", _MIGRATIONS)
        except BaseException:
            self.db.close()
            raise

    def create_tenant(self, name: str, limits: dict[str, Any] | None = None) -> Tenant:
        tenant = Tenant(validate_tenant(name), time.time(), dict(limits or {}))
        try:
            with self.db.transaction() as cur:
                cur.execute("INSERT INTO tenants VALUES (%s, %s, %s)", (name, tenant.created_at, json.dumps(tenant.limits)))
        except psycopg.errors.UniqueViolation:
            raise TenantExistsError(name) from None
        return tenant

    def get_tenant(self, name: str) -> Tenant:
        try:
            with self.db.transaction() as cur:
                row = cur.execute("SELECT name, created_at, limits FROM tenants WHERE name=%s", (name,)).fetchone()
        except StoreUnavailableError:
            known: Tenant | None = self._tenants.recall(name)
            if known is None:
                raise
            return known
        if row is None:
            self._tenants.forget(name)
            raise TenantNotFoundError(name)
        tenant = Tenant(row[0], row[1], json.loads(row[2]))
        self._tenants.remember(name, tenant)
        return tenant

    def list_tenants(self) -> list[Tenant]:
        with self.db.transaction() as cur:
            rows = cur.execute("SELECT name, created_at, limits FROM tenants ORDER BY name").fetchall()
        return [Tenant(r[0], r[1], json.loads(r[2])) for r in rows]

    def set_limits(self, name: str, limits: dict[str, Any]) -> Tenant:
        with self.db.transaction() as cur:
            if not cur.execute("UPDATE tenants SET limits=%s WHERE name=%s", (json.dumps(limits), name)).rowcount:
                raise TenantNotFoundError(name)
        return self.get_tenant(name)

    def create_key(self, tenant: str) -> tuple[ApiKey, str]:
        self.get_tenant(tenant)
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        record = ApiKey(key_id, tenant, time.time())
        with self.db.transaction() as cur:
            cur.execute("INSERT INTO api_keys VALUES (%s, %s, %s, %s, NULL)",
                        (key_id, tenant, key_digest(secret), record.created_at))
        return record, f"{KEY_PREFIX}{key_id}.{secret}"

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        with self.db.transaction() as cur:
            if tenant is None:
                rows = cur.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created_at").fetchall()
            else:
                rows = cur.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE tenant=%s ORDER BY created_at",
                                   (tenant,)).fetchall()
        return [ApiKey(*row) for row in rows]

    def revoke_key(self, key_id: str) -> ApiKey:
        with self.db.transaction() as cur:  # revoking twice is harmless: the key stays revoked at its first time
            cur.execute("UPDATE api_keys SET revoked_at=%s WHERE id=%s AND revoked_at IS NULL", (time.time(), key_id))
            row = cur.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id=%s", (key_id,)).fetchone()
        if row is None:
            raise KeyNotFoundError(key_id)
        return ApiKey(*row)

    def key_hashes(self) -> list[tuple[str, str, float, float | None, str]]:
        """(id, tenant, created_at, revoked_at, secret_sha256) of every key: what a migration copies."""
        with self.db.transaction() as cur:
            return [tuple(r) for r in cur.execute(f"SELECT {_KEY_COLUMNS}, secret_sha256 FROM api_keys").fetchall()]  # type: ignore[misc]

    def import_key(self, key: ApiKey, secret_sha256: str) -> None:
        with self.db.transaction() as cur:
            cur.execute("INSERT INTO api_keys VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                        (key.id, key.tenant, secret_sha256, key.created_at, key.revoked_at))

    def import_tenant(self, tenant: Tenant) -> None:
        with self.db.transaction() as cur:
            cur.execute("INSERT INTO tenants VALUES (%s, %s, %s) ON CONFLICT (name) DO NOTHING",
                        (tenant.name, tenant.created_at, json.dumps(tenant.limits)))

    def authenticate(self, key: str) -> str | None:
        parts = split_key(key)
        if parts is None:
            return None
        key_id, secret = parts
        presented = hashlib.sha256(key.encode()).hexdigest()
        try:
            with self.db.transaction() as cur:
                row = cur.execute("SELECT tenant, secret_sha256 FROM api_keys WHERE id=%s AND revoked_at IS NULL",
                                  (key_id,)).fetchone()
        except StoreUnavailableError:
            known: str | None = self._keys.recall(presented)
            if known is None:
                raise
            return known
        stored = row[1] if row is not None else key_digest("")  # compare anyway: same work for unknown ids
        tenant = row[0] if hmac.compare_digest(key_digest(secret), stored) and row is not None else None
        (self._keys.forget(presented) if tenant is None else self._keys.remember(presented, tenant))
        return tenant

    def close(self) -> None:
        self.db.close()
