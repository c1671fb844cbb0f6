"""An app on a tiny random model and byte tokenizer, driven in-process through the app factory."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from reft_core.artifact import encode_artifact
from reft_core.base_model import BaseModel
from reft_core.config import InterventionConfig
from reft_core.fingerprint import fingerprint_model
from reft_core.intervention import Intervention
from server.app import create_app
from server.settings import Settings
from tests import tiny
from tests.reft_core.conftest import random_intervention

MODEL_ID = "tiny-llama"


@pytest.fixture(scope="session")
def tiny_base() -> BaseModel:
    model = tiny.tiny_llama()
    return BaseModel(
        model=model, tokenizer=tiny.tiny_tokenizer(), fingerprint=fingerprint_model(model), model_id=MODEL_ID,
        model_dir=Path("."), device=torch.device("cpu"), dtype=torch.float32,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny model saved as a local HF directory, for server processes started from the command line."""
    return tiny.save_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


# REFT_TEST_STORE=postgres runs every in-process app of tests/server on PostgreSQL (a fresh schema per app), to
# check the whole server suite on that backend; `make test` runs tests/server/test_shared_store.py on it instead.
_new_store: list[Callable[[], str]] = []


@pytest.fixture(scope="session", autouse=True)
def _store_backend_from_environment(request: pytest.FixtureRequest) -> Iterator[None]:
    if os.environ.get("REFT_TEST_STORE") == "postgres":
        _new_store.append(request.getfixturevalue("postgres").new_schema)
    yield
    _new_store.clear()


def make_settings(tmp_path: Path, **overrides) -> Settings:
    defaults = {"data_dir": tmp_path / "data", "max_tokens_limit": 64, "default_max_tokens": 16}
    if _new_store and "store" not in overrides:
        defaults["store"] = _new_store[0]()
    return Settings(**(defaults | overrides))


@pytest.fixture
def client(tmp_path, tiny_base) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(tmp_path), base_model=tiny_base)) as test_client:
        yield test_client


@pytest.fixture
def local_client(tmp_path, tiny_base) -> Iterator[TestClient]:
    """On the local store whatever REFT_TEST_STORE says: for tests of files and disks."""
    with TestClient(create_app(make_settings(tmp_path, store=None), base_model=tiny_base)) as test_client:
        yield test_client


def persona(seed: int, config: InterventionConfig | None = None) -> Intervention:
    config = config or InterventionConfig(layers=(0, 2), rank=4, positions="f1+l1")
    return random_intervention(config, seed=seed, scale=3.0)


def artifact_bytes(base: BaseModel, intervention: Intervention) -> bytes:
    return encode_artifact(intervention, base.fingerprint)[0]


def upload(client: TestClient, name: str, payload: bytes, **fields) -> dict:
    response = client.post(
        "/v1/interventions", data={"name": name, **fields}, files={"file": (f"{name}.safetensors", payload)}
    )
    assert response.status_code == 201, response.text
    return response.json()
