"""Fixtures for store tests: the tiny Llama's fingerprint, artifact payloads for it, and a fresh store."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters_store import ArtifactStore
from reft_core.artifact import encode_artifact
from reft_core.config import InterventionConfig
from reft_core.fingerprint import ModelFingerprint, fingerprint_model
from tests.reft_core.conftest import random_intervention, tiny_llama

CONFIG = InterventionConfig(layers=(1,), rank=2, positions="l1")


def make_payload(fingerprint: ModelFingerprint, seed: int = 0) -> bytes:
    return encode_artifact(random_intervention(CONFIG, seed=seed), fingerprint, {"steps": seed})[0]


@pytest.fixture(scope="session")
def fingerprint() -> ModelFingerprint:
    return fingerprint_model(tiny_llama())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(root: Path, fingerprint: ModelFingerprint) -> ArtifactStore:
    return ArtifactStore(root, fingerprint)
