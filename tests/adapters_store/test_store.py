"""Store: round trips, versions, typed errors, tenants, restart survival, shared content, concurrent writers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from adapters_store import (
    ArtifactStore,
    InterventionExistsError,
    InterventionNotFoundError,
    InvalidMetadataError,
    InvalidNameError,
    StoreStats,
)
from adapters_store.local import LocalBackend
from reft_core.artifact import encode_artifact
from reft_core.errors import ArtifactFormatError, IncompatibleBaseModelError
from reft_core.fingerprint import ModelFingerprint, fingerprint_model
from tests.adapters_store.conftest import CONFIG, make_payload
from tests.reft_core.conftest import random_intervention, tiny_llama


def temp_files(store: ArtifactStore) -> list[Path]:
    """Leftovers of interrupted file writes (a PostgreSQL store writes bytes in its transaction: none there)."""
    return store.files.temp_files() if isinstance(store.backend, LocalBackend) else []


def nothing_written(store: ArtifactStore) -> bool:
    return not store.blob_addresses() and not store.list() and store.stats() == StoreStats(0, 0, 0)


def test_put_get_list_delete(store: ArtifactStore, fingerprint: ModelFingerprint) -> None:
    payload = make_payload(fingerprint, 1)
    record = store.put("emoji-bot", payload, description="emojis", tags=["fun"], source="training")
    assert (record.name, record.version, record.tenant) == ("emoji-bot", 1, "default")
    assert (record.description, record.tags, record.source) == ("emojis", ("fun",), "training")
    assert record.size_bytes == len(payload) and record.digest.startswith("sha256:")
    assert record.base_model_id == fingerprint.id and record.config == CONFIG.to_dict()
    assert record.training == {"steps": 1} and record.created_at.endswith("+00:00")
    assert store.get("emoji-bot") == record and store.list() == [record]
    assert store.read_artifact(record) == payload and store.load(record).digest == record.digest
    store.delete("emoji-bot")
    with pytest.raises(InterventionNotFoundError, match="emoji-bot"):
        store.get("emoji-bot")
    with pytest.raises(InterventionNotFoundError, match="emoji-bot"):
        store.delete("emoji-bot")
    assert store.list() == [] and nothing_written(store) and store.gc() == 0  # the delete removed the file


def test_list_is_sorted_by_name_and_shows_current_versions(store: ArtifactStore, fingerprint: ModelFingerprint) -> None:
    for seed, name in enumerate(["zeta", "alpha", "mid"]):
        store.put(name, make_payload(fingerprint, seed))
    store.put("mid", make_payload(fingerprint, 9), replace=True)
    assert [(r.name, r.version) for r in store.list()] == [("alpha", 1), ("mid", 2), ("zeta", 1)]


def test_replace_makes_a_new_current_version(store: ArtifactStore, fingerprint: ModelFingerprint) -> None:
    first = store.put("p", make_payload(fingerprint, 1))
    second = store.put("p", make_payload(fingerprint, 2), replace=True)
    third = store.put("p", make_payload(fingerprint, 3), replace=True)
    assert (second.version, third.version) == (2, 3) and len({first.digest, second.digest, third.digest}) == 3
    assert store.get("p") == third and store.get_version("p", 1) == first and store.get_version("p", 2) == second
    assert store.load(first).digest == first.digest  # old versions stay readable for requests still running
    assert store.stats() == StoreStats(interventions=1, versions=3, bytes=first.size_bytes * 3)
    with pytest.raises(InterventionNotFoundError, match="'p' version 4"):
        store.get_version("p", 4)


def test_versions_never_repeat_after_delete(store: ArtifactStore, fingerprint: ModelFingerprint) -> None:
    store.put("p", make_payload(fingerprint, 1))
    store.delete("p")
    with pytest.raises(InterventionNotFoundError):
        store.get_version("p", 1)  # delete removes every version
    assert store.put("p", make_payload(fingerprint, 2)).version == 1


def test_existing_and_unknown_names_are_typed_errors(store: ArtifactStore, fingerprint: ModelFingerprint) -> None:
    kept = store.put("p", make_payload(fingerprint, 1))
    with pytest.raises(InterventionExistsError, match="'p' already exists"):
        store.put("p", make_payload(fingerprint, 2))
    with pytest.raises(InterventionNotFoundError, match="'unknown'"):
        store.put("unknown", make_payload(fingerprint, 3), replace=True)
    assert store.list() == [kept] and len(store.blob_addresses()) == 1  # refusals leave no orphan artifact


@pytest.mark.parametrize("name", ["../x", "/abs", "A", "a b", "a\x00", "é", "a" * 65, "..", ""])
def test_invalid_names_write_nothing(store: ArtifactStore, fingerprint: ModelFingerprint, name: str) -> None:
    with pytest.raises(InvalidNameError):
        store.put(name, make_payload(fingerprint))
    with pytest.raises(InvalidNameError):
        store.get(name)
    assert nothing_written(store) and not temp_files(store)


def test_bad_metadata_writes_nothing(store: ArtifactStore, fingerprint: ModelFingerprint) -> None:
    with pytest.raises(InvalidMetadataError):
        store.put("p", make_payload(fingerprint), description="x" * 2001)
    with pytest.raises(InvalidMetadataError):
        store.put("p", make_payload(fingerprint), source="elsewhere")
    assert nothing_written(store)


def test_artifact_for_another_base_model_writes_nothing(store: ArtifactStore) -> None:
    foreign = encode_artifact(random_intervention(CONFIG), fingerprint_model(tiny_llama(seed=5)))[0]
    with pytest.raises(IncompatibleBaseModelError, match="another base model"):
        store.put("x", foreign)
    assert nothing_written(store)


def test_malformed_payload_writes_nothing(store: ArtifactStore, fingerprint: ModelFingerprint) -> None:
    with pytest.raises(ArtifactFormatError):
        store.put("x", make_payload(fingerprint)[:-7])
    with pytest.raises(ArtifactFormatError):
        store.put("x", b"not an artifact at all")
    assert nothing_written(store)


def test_tenants_are_separate_namespaces(store: ArtifactStore, fingerprint: ModelFingerprint) -> None:
    mine = store.put("p", make_payload(fingerprint, 1))
    theirs = store.put("p", make_payload(fingerprint, 2), tenant="acme")
    assert theirs.version == 1 and store.get("p") == mine and store.get("p", tenant="acme") == theirs
    assert store.list() == [mine] and store.list("acme") == [theirs]
    with pytest.raises(InterventionNotFoundError, match="tenant 'other'"):
        store.get("p", tenant="other")
    with pytest.raises(InvalidNameError, match="tenant"):
        store.list("../etc")
    store.delete("p", tenant="acme")
    assert store.get("p") == mine


def test_everything_survives_a_restart(root: Path, store: ArtifactStore, fingerprint: ModelFingerprint) -> None:
    first = store.put("a", make_payload(fingerprint, 1), description="d", tags=["t"])
    second = store.put("a", make_payload(fingerprint, 2), replace=True)
    other = store.put("b", make_payload(fingerprint, 3), tenant="acme")
    store.close()
    reopened = ArtifactStore(root, fingerprint)
    assert reopened.get("a") == second and reopened.get_version("a", 1) == first
    assert reopened.list("acme") == [other] and reopened.stats() == StoreStats(2, 3, 3 * first.size_bytes)
    assert reopened.load(first).digest == first.digest
    assert reopened.put("a", make_payload(fingerprint, 4), replace=True).version == 3


def test_identical_content_is_stored_once(store: ArtifactStore, fingerprint: ModelFingerprint) -> None:
    one = store.put("one", make_payload(fingerprint))
    two = store.put("two", make_payload(fingerprint))
    assert one.file_sha256 == two.file_sha256 and len(store.blob_addresses()) == 1
    assert store.stats().bytes == one.size_bytes  # counted once, as on disk
    store.delete("one")
    assert store.gc() == 0  # still referenced by "two"
    assert store.load(two).digest == two.digest


def test_concurrent_replaces_get_distinct_contiguous_versions(
    store: ArtifactStore, fingerprint: ModelFingerprint
) -> None:
    store.put("p", make_payload(fingerprint, 0))
    payloads = [make_payload(fingerprint, seed) for seed in range(1, 9)]
    versions: list[int] = []

    def replace(payload: bytes) -> None:
        versions.append(store.put("p", payload, replace=True).version)

    threads = [threading.Thread(target=replace, args=(payload,)) for payload in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(versions) == list(range(2, 10)) and store.get("p").version == 9


def test_public_flag_survives_new_versions_and_usage_counts_one_tenant(store: ArtifactStore, fingerprint) -> None:
    first = store.put("shared", make_payload(fingerprint, 1), tenant="acme")
    store.put("mine", make_payload(fingerprint, 2))
    assert store.usage("acme") == (1, first.size_bytes) and store.usage("nobody") == (0, 0)
    assert store.list_public() == []
    assert store.set_public("shared", True, tenant="acme").public
    second = store.put("shared", make_payload(fingerprint, 3), tenant="acme", replace=True)
    assert second.version == 2 and second.public and [r.name for r in store.list_public()] == ["shared"]
    assert not store.set_public("shared", False, tenant="acme").public and store.list_public() == []
    with pytest.raises(InterventionNotFoundError):
        store.set_public("shared", True)  # the default tenant has no such name


def test_load_digest_finds_any_version_holding_the_artifact(store: ArtifactStore, fingerprint: ModelFingerprint) -> None:
    """What an engine replica handed only a digest reads (Ray Serve): any tenant, name or version with it."""
    from adapters_store import ArtifactUnavailableError

    first = store.put("a", make_payload(fingerprint, 1), tenant="acme")
    second = store.put("a", make_payload(fingerprint, 2), tenant="acme", replace=True)
    for record in (first, second):  # the old version too: a request pinned to it may still be routed
        artifact = store.load_digest(record.digest)
        assert artifact.digest == record.digest and artifact.intervention.config.to_dict() == record.config
    store.delete("a", "acme")
    with pytest.raises(ArtifactUnavailableError, match="deleted"):
        store.load_digest(second.digest)


def test_visible_names_are_the_listed_names_by_prefix_and_limit(store: ArtifactStore, fingerprint) -> None:
    """The names-only query (a 404's hint) agrees with the record listings: own names sorted, then other
    tenants' public ones as owner/name, each filtered by prefix (on the owner for public ones) and limited."""
    payload = make_payload(fingerprint, 0)
    for tenant, name in [("acme", "apple"), ("acme", "avocado"), ("acme", "berry"), ("beta", "apricot"),
                         ("alpha", "secret"), ("alpha", "shared"), ("ant", "open")]:
        store.put(name, payload, tenant=tenant)
    for tenant, name in [("alpha", "shared"), ("ant", "open"), ("acme", "berry")]:
        store.set_public(name, True, tenant=tenant)
    own = [r.name for r in store.list("acme")]
    public = [f"{r.tenant}/{r.name}" for r in store.list_public() if r.tenant != "acme"]
    assert store.visible_names("acme", "", 100) == own + public == ["apple", "avocado", "berry", "alpha/shared",
                                                                    "ant/open"]
    assert store.visible_names("acme", "a", 100) == ["apple", "avocado", "alpha/shared", "ant/open"]
    assert store.visible_names("acme", "av", 100) == ["avocado"]
    assert store.visible_names("acme", "a", 1) == ["apple", "alpha/shared"]
    assert store.visible_names("beta", "", 100) == ["apricot", "acme/berry", "alpha/shared", "ant/open"]
    assert store.visible_names("nobody", "z", 100) == []
