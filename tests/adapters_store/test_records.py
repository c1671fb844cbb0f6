"""Name rules and metadata bounds (tables), and the record's JSON view."""

from __future__ import annotations

import json

import pytest

from adapters_store import InterventionRecord, InvalidMetadataError, InvalidNameError, validate_name
from adapters_store.records import validate_metadata

BAD_NAMES = ["../x", "/abs", "A", "a b", "a\x00", "é", "a" * 65, "..", "", "-a", ".a", "a/b", "a..b", "a\n", "a\\b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidNameError, match="invalid intervention name"):
        validate_name(name)


@pytest.mark.parametrize("name", ["a", "0", "emoji-bot", "v1.2_final", "a" * 64, "a.b-c_d"])
def test_valid_names_pass(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("description", "tags", "source", "fragment"),
    [
        ("x" * 2001, (), "upload", "description"),
        ("", "fun", "upload", "not one string"),
        ("", ["x" * 65], "upload", "tag"),
        ("", [""], "upload", "tag"),
        ("", [3], "upload", "tag"),
        ("", ["t"] * 33, "upload", "at most"),
        ("", (), "scraped", "source"),
    ],
)
def test_metadata_bounds(description: str, tags: object, source: str, fragment: str) -> None:
    with pytest.raises(InvalidMetadataError, match=fragment):
        validate_metadata(description, tags, source)  # type: ignore[arg-type]


def test_metadata_within_bounds_passes() -> None:
    assert validate_metadata("x" * 2000, ["fun", "emoji"], "pyreft-import") == ("fun", "emoji")


def test_to_dict_is_json_and_hides_the_file_address() -> None:
    record = InterventionRecord(
        name="p", version=2, tenant="default", digest="sha256:ab", file_sha256="cd" * 32, size_bytes=10,
        base_model_id="f00", config={"layers": [1]}, created_at="2024-01-01T00:00:00.000+00:00",
        tags=("a",), training={"steps": 3},
    )
    data = json.loads(json.dumps(record.to_dict()))
    assert data["id"] == "p" and data["version"] == 2 and data["tags"] == ["a"] and "file_sha256" not in data
