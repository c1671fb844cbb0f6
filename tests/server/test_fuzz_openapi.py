"""Property-based fuzzing of the whole OpenAPI schema (schemathesis) against a real server process on loopback:
schema-valid and schema-violating requests to every operation; no response may be a 5xx.

Driven through schemathesis' strategies and hypothesis directly (its pytest plugin does not support this pytest).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from .process import server_process

EXAMPLES_PER_OPERATION = 20


@pytest.fixture(scope="module")
def fuzz_url(tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    with server_process(tiny_model_dir, data_dir, "--request-timeout", "30") as (_, url):
        yield url


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_request_gets_a_server_error(fuzz_url: str, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15  # every route is in the schema
    fuzzed: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case) -> None:  # noqa: ANN001
            case.call_and_validate(base_url=fuzz_url, checks=[not_a_server_error], timeout=60)

        try:
            call()
        except Unsatisfiable:
            # no schema-violating request exists (no parameters, or only free-form strings, e.g. GET /health)
            assert mode is GenerationMode.NEGATIVE, operation.label
            continue
        fuzzed.append(operation.label)
    assert len(fuzzed) >= (len(operations) if mode is GenerationMode.POSITIVE else 8), fuzzed
