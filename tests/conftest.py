"""Session fixtures shared across the suite: the embedded SmolLM2 model for end-to-end tests, and a PostgreSQL
database for the tests that run the store on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from reft_core.base_model import BaseModel, load_base_model
from tests.shared_services import ScratchDatabase, redis_prefix, scratch_database


@pytest.fixture(scope="session")
def smollm2() -> BaseModel:
    """The embedded default model on CPU fp32 (the first run converts the GGUF into the user cache, ~40 s)."""
    return load_base_model(device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def postgres() -> Iterator[ScratchDatabase]:
    """A PostgreSQL database for this test session (dropped at its end)."""
    yield from scratch_database()


@pytest.fixture(scope="session")
def redis_keys() -> Iterator[str]:
    """A Redis key prefix for this test session (its keys deleted at its end)."""
    yield from redis_prefix()
