"""Tenants and API keys: keys are shown once and stored hashed; revocation and malformed keys fail closed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters_store.errors import InvalidNameError
from adapters_store.tenants import (
    KeyNotFoundError,
    TenantExistsError,
    TenantNotFoundError,
    TenantStore,
    open_tenants,
)


@pytest.fixture(params=["local", "postgres"])
def tenants(request: pytest.FixtureRequest, tmp_path) -> Iterator[TenantStore]:
    location = tmp_path if request.param == "local" else request.getfixturevalue("postgres").new_schema()
    opened = open_tenants(location)
    yield opened
    opened.close()


def stored_bytes(tenants: TenantStore, tmp_path) -> bytes:
    """Everything the store keeps: the database files, or every row of the PostgreSQL tables."""
    if isinstance(tenants, TenantStore):
        return b"".join(p.read_bytes() for p in tmp_path.glob("tenants.sqlite3*"))
    with tenants.db.transaction() as cur:
        rows = cur.execute("SELECT * FROM api_keys").fetchall() + cur.execute("SELECT * FROM tenants").fetchall()
    return repr(rows).encode()


def test_keys_authenticate_their_tenant_and_are_never_stored(tenants: TenantStore, tmp_path) -> None:
    tenants.create_tenant("acme")
    tenants.create_tenant("globex", {"requests_per_minute": 5})
    record, key = tenants.create_key("acme")
    _, other = tenants.create_key("globex")
    assert tenants.authenticate(key) == "acme" and tenants.authenticate(other) == "globex"
    assert [k.id for k in tenants.list_keys("acme")] == [record.id]
    assert tenants.get_tenant("globex").limits == {"requests_per_minute": 5}
    raw = stored_bytes(tenants, tmp_path)
    assert key.encode() not in raw and key.split(".")[1].encode() not in raw  # only the hash is stored
    assert len(tenants.key_hashes()) == 2 and record.id.encode() in raw


def test_revoked_tampered_and_malformed_keys_fail(tenants: TenantStore) -> None:
    tenants.create_tenant("acme")
    record, key = tenants.create_key("acme")
    key_id, secret = key[3:].split(".")
    for bad in ("", "rs-", "rs-.x", key + "x", f"rs-{key_id}.{secret[:-1]}", f"rs-nope.{secret}", secret, "Bearer " + key):
        assert tenants.authenticate(bad) is None, bad
    assert tenants.revoke_key(record.id).revoked_at is not None
    assert tenants.authenticate(key) is None
    assert tenants.revoke_key(record.id).revoked_at is not None  # idempotent


def test_unknown_and_duplicate_tenants(tenants: TenantStore) -> None:
    tenants.create_tenant("acme")
    with pytest.raises(TenantExistsError):
        tenants.create_tenant("acme")
    with pytest.raises(TenantNotFoundError):
        tenants.create_key("nobody")
    with pytest.raises(KeyNotFoundError):
        tenants.revoke_key("nope")
    with pytest.raises(InvalidNameError):
        tenants.create_tenant("../etc")
    assert [t.name for t in tenants.list_tenants()] == ["acme"]


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_no_made_up_key_authenticates(tmp_path_factory, text: str) -> None:
    tenants = TenantStore(tmp_path_factory.mktemp("keys"))
    tenants.create_tenant("acme")
    _, key = tenants.create_key("acme")
    assert tenants.authenticate(text) is None or text == key


def test_a_read_only_directory_still_authenticates_and_refuses_changes(tmp_path, monkeypatch) -> None:
    import os

    from adapters_store.errors import StoreWriteError

    writable = TenantStore(tmp_path)
    writable.create_tenant("acme")
    _, key = writable.create_key("acme")
    writable.close()
    monkeypatch.setattr(os, "access", lambda *_args, **_kwargs: False)
    read_only = TenantStore(tmp_path)
    assert read_only.read_only and read_only.authenticate(key) == "acme"
    with pytest.raises(StoreWriteError, match="read-only"):
        read_only.create_tenant("globex")
    with pytest.raises(StoreWriteError, match="read-only"):
        read_only.create_key("acme")
    empty = TenantStore(tmp_path / "never-written")  # nothing on disk and cannot write: empty, read-only
    assert empty.read_only and empty.list_tenants() == [] and empty.authenticate(key) is None
