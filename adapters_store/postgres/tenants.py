"""Tenants and API keys on PostgreSQL: the same rules as `adapters_store.tenants` (keys stored as hashes of their
secrets, compared in constant time), shared by every replica. A revoked key is refused by every replica at its
next request: authentication reads the key's row each time (one indexed lookup), nothing caches it."""

from __future__ import annotations

import hmac
import json
import secrets
import time
from typing import Any

import psycopg

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


class PostgresTenantStore:
    read_only = False

    def __init__(self, url: str) -> None:
        self.db = Database(url, max_connections=4)
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
        with self.db.transaction() as cur:
            row = cur.execute("SELECT name, created_at, limits FROM tenants WHERE name=%s", (name,)).fetchone()
        if row is None:
            raise TenantNotFoundError(name)
        return Tenant(row[0], row[1], json.loads(row[2]))

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
        with self.db.transaction() as cur:
            row = cur.execute("SELECT tenant, secret_sha256 FROM api_keys WHERE id=%s AND revoked_at IS NULL",
                              (key_id,)).fetchone()
        stored = row[1] if row is not None else key_digest("")  # compare anyway: same work for unknown ids
        return row[0] if hmac.compare_digest(key_digest(secret), stored) and row is not None else None

    def close(self) -> None:
        self.db.close()
