"""Session fixtures shared across the suite: the embedded SmolLM2 model for end-to-end tests."""

from __future__ import annotations

import pytest

from reft_core.base_model import BaseModel, load_base_model


@pytest.fixture(scope="session")
def smollm2() -> BaseModel:
    """The embedded default model on CPU fp32 (the first run converts the GGUF into the user cache, ~40 s)."""
    return load_base_model(device="cpu", dtype="float32")
