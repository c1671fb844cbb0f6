"""Fixtures of the engine tests: the tiny random Llama and its byte tokenizer (frozen; shared per module)."""

from __future__ import annotations

import pytest

from tests import tiny


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_llama()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.tiny_tokenizer()
