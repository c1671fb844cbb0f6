"""Fixtures for store tests: the tiny Llama's fingerprint, artifact payloads for it, and fresh stores on each
backend (`store` and `root` are parametrized: the local directory and a PostgreSQL schema of their own)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapters_store import ArtifactStore
from reft_core.artifact import encode_artifact
from reft_core.config import InterventionConfig
from reft_core.fingerprint import ModelFingerprint, fingerprint_model
from tests.reft_core.conftest import random_intervention, tiny_llama

CONFIG = InterventionConfig(layers=(1,), rank=2, positions="l1")
NewLocation = Callable[[], "Path | str"]


def make_payload(fingerprint: ModelFingerprint, seed: int = 0) -> bytes:
    return encode_artifact(random_intervention(CONFIG, seed=seed), fingerprint, {"steps": seed})[0]


@pytest.fixture(scope="session")
def fingerprint() -> ModelFingerprint:
    return fingerprint_model(tiny_llama())


@pytest.fixture(params=["local", "postgres"])
def new_location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NewLocation]:
    """Makes empty store locations on the test's backend: directories, or PostgreSQL URLs of fresh schemas."""
    made: list[str] = []

    def new() -> Path | str:
        if request.param == "local":
            made.append("")
            return tmp_path / f"store{len(made) if len(made) > 1 else ''}"
        url = request.getfixturevalue("postgres").new_schema()
        made.append(url)
        return url

    yield new
    if request.param == "postgres":
        for url in made:
            request.getfixturevalue("postgres").close_connections(url)


@pytest.fixture
def root(new_location: NewLocation) -> Path | str:
    return new_location()


@pytest.fixture
def store(root: Path | str, fingerprint: ModelFingerprint) -> Iterator[ArtifactStore]:
    opened = ArtifactStore(root, fingerprint)
    yield opened
    opened.close()


@pytest.fixture
def local_root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def local_store(local_root: Path, fingerprint: ModelFingerprint) -> ArtifactStore:
    """For what only a directory has: files on disk, read-only roots, SQLite migrations."""
    return ArtifactStore(local_root, fingerprint)
