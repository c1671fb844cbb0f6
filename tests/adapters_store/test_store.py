"""Store: round trips, versions, typed errors, restart survival, corruption isolation, crash consistency."""

from __future__ import annotations

import errno
import os

import pytest

from adapters_store import (
    ArtifactStore,
    ArtifactUnavailableError,
    InterventionExistsError,
    InterventionNotFoundError,
    InvalidNameError,
    StoreWriteError,
)
from reft_core.artifact import encode_artifact
from reft_core.config import InterventionConfig
from reft_core.errors import IncompatibleBaseModelError
from reft_core.fingerprint import fingerprint_model
from tests.reft_core.conftest import random_intervention, tiny_llama

CONFIG = InterventionConfig(layers=(1,), rank=2, positions="l1")


@pytest.fixture(scope="module")
def fingerprint():
    return fingerprint_model(tiny_llama())


def payload(fingerprint, seed: int = 0) -> bytes:
    return encode_artifact(random_intervention(CONFIG, seed=seed), fingerprint)[0]


@pytest.fixture
def store(tmp_path, fingerprint) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store", fingerprint)


def test_put_get_list_delete(store, fingerprint) -> None:
    record = store.put("emoji-bot", payload(fingerprint), description="emojis", tags=["fun"])
    assert (record.name, record.version, record.description, record.tags) == ("emoji-bot", 1, "emojis", ("fun",))
    assert store.get("emoji-bot") == record
    assert [r.name for r in store.list()] == ["emoji-bot"]
    assert store.load(record).digest == record.digest
    store.delete("emoji-bot")
    with pytest.raises(InterventionNotFoundError, match="emoji-bot"):
        store.get("emoji-bot")
    with pytest.raises(InterventionNotFoundError):
        store.delete("emoji-bot")


def test_replace_makes_a_new_current_version(store, fingerprint) -> None:
    first = store.put("p", payload(fingerprint, 1))
    with pytest.raises(InterventionExistsError):
        store.put("p", payload(fingerprint, 2))
    second = store.put("p", payload(fingerprint, 2), replace=True)
    assert second.version == 2 and second.digest != first.digest
    assert store.get("p") == second and store.get_version("p", 1) == first
    assert store.load(first).digest == first.digest  # the old version stays readable for running requests
    with pytest.raises(InterventionNotFoundError):
        store.put("unknown", payload(fingerprint), replace=True)


@pytest.mark.parametrize("name", ["../x", "/abs", "A", "a b", "a\x00", "é", "a" * 65, "..", "", "-a", "a/b", "a..b"])
def test_invalid_names_are_refused(store, fingerprint, name) -> None:
    with pytest.raises(InvalidNameError):
        store.put(name, payload(fingerprint))
    assert not store.files.all_files()


def test_other_base_model_writes_nothing(store) -> None:
    foreign = encode_artifact(random_intervention(CONFIG), fingerprint_model(tiny_llama(seed=5)))[0]
    with pytest.raises(IncompatibleBaseModelError):
        store.put("x", foreign)
    assert not store.files.all_files() and not store.list()


def test_survives_restart(tmp_path, store, fingerprint) -> None:
    store.put("a", payload(fingerprint, 1))
    store.put("a", payload(fingerprint, 2), replace=True)
    reopened = ArtifactStore(tmp_path / "store", fingerprint)
    assert reopened.get("a").version == 2 and reopened.stats().versions == 2


def test_corrupt_file_makes_only_that_intervention_unavailable(store, fingerprint) -> None:
    bad, good = store.put("bad", payload(fingerprint, 1)), store.put("good", payload(fingerprint, 2))
    path = store.files.path_for(bad.file_sha256)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactUnavailableError, match="corrupt on disk"):
        store.load(bad)
    assert store.load(good).digest == good.digest
    path.unlink()
    with pytest.raises(ArtifactUnavailableError, match="file missing"):
        store.load(bad)


def test_crash_before_index_commit_leaves_nothing_visible(store, fingerprint, monkeypatch) -> None:
    def crash(*_args, **_kwargs):
        raise KeyboardInterrupt  # stands in for a kill between the file write and the commit

    monkeypatch.setattr(store, "_insert", crash)
    with pytest.raises(KeyboardInterrupt):
        store.put("x", payload(fingerprint))
    monkeypatch.undo()
    assert not store.list() and len(store.files.all_files()) == 1
    assert store.gc() == 1 and not store.files.all_files()
    assert store.put("x", payload(fingerprint)).version == 1


def test_shared_content_is_stored_once(store, fingerprint) -> None:
    store.put("one", payload(fingerprint))
    two = store.put("two", payload(fingerprint))
    assert len(store.files.all_files()) == 1
    store.delete("one")
    store.gc()
    assert store.load(two).digest == two.digest


def test_disk_full_is_a_clean_write_error(store, fingerprint, monkeypatch) -> None:
    kept = store.put("kept", payload(fingerprint, 1))

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(StoreWriteError, match="disk full"):
        store.put("new", payload(fingerprint, 2))
    monkeypatch.undo()
    assert [r.name for r in store.list()] == ["kept"] and store.load(kept).digest == kept.digest
    assert not store.files.temp_files()


def test_read_only_store_serves_reads_and_refuses_writes(tmp_path, store, fingerprint, monkeypatch) -> None:
    store.put("a", payload(fingerprint))
    monkeypatch.setattr(os, "access", lambda *_a, **_k: False)  # root ignores chmod; simulate a read-only mount
    readonly = ArtifactStore(tmp_path / "store", fingerprint)
    assert readonly.read_only and readonly.load(readonly.get("a"))
    with pytest.raises(StoreWriteError, match="read-only"):
        readonly.put("b", payload(fingerprint, 3))
