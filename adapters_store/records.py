"""Intervention records (the store's metadata about one version of one intervention) and the rules for names.

Names become URL path segments and `model` strings, so they are restricted to a small, case-free alphabet with no
path separators and no `..`; tenants follow the same rule. Metadata bounds live here too, so every writer (upload,
pyreft import, training) is held to the same limits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from adapters_store.errors import InvalidMetadataError, InvalidNameError

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
SOURCES = ("upload", "pyreft-import", "training")
MAX_DESCRIPTION_CHARS = 2000
MAX_TAGS = 32
MAX_TAG_CHARS = 64
# Version numbers fit 9 decimal digits: a larger number in a URL or `name@N` is simply not found (and never reaches
# SQLite, whose integers overflow at 2**63).
MAX_VERSION = 999_999_999


def validate_name(name: str, *, what: str = "intervention name") -> str:
    # `fullmatch`, not `match` with `$`: `$` also matches before a trailing newline
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"invalid {what} {name!r:.80}: use 1-64 characters from a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


def validate_tenant(tenant: str) -> str:
    return validate_name(tenant, what="tenant")


def validate_metadata(description: str, tags: Iterable[str], source: str) -> tuple[str, ...]:
    """Check the caller-supplied metadata; return the tags as a tuple."""
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidMetadataError(f"description must be a string of at most {MAX_DESCRIPTION_CHARS} characters")
    if isinstance(tags, str):  # a bare string is iterable too; "fun" must not become ("f", "u", "n")
        raise InvalidMetadataError("tags must be a list of strings, not one string")
    tag_tuple = tuple(tags)
    if len(tag_tuple) > MAX_TAGS:
        raise InvalidMetadataError(f"at most {MAX_TAGS} tags are allowed, got {len(tag_tuple)}")
    for tag in tag_tuple:
        if not isinstance(tag, str) or not 1 <= len(tag) <= MAX_TAG_CHARS or not tag.isprintable():
            raise InvalidMetadataError(f"tag {tag!r:.80} must be 1-{MAX_TAG_CHARS} printable characters")
    if source not in SOURCES:
        raise InvalidMetadataError(f"source {source!r:.80} must be one of {list(SOURCES)}")
    return tag_tuple


@dataclass(frozen=True)
class StorageQuota:
    """What one tenant may store: names with a current version, and bytes of every retained version of them."""

    max_interventions: int
    max_bytes: int


@dataclass(frozen=True)
class InterventionRecord:
    name: str
    version: int
    tenant: str
    digest: str  # the artifact's content digest ("sha256:..."), also its identity in the engine
    file_sha256: str  # hash of the stored file's bytes: the file's address, checked on every read
    size_bytes: int
    base_model_id: str
    config: dict[str, Any]
    created_at: str  # UTC, ISO 8601
    source: str = "upload"
    description: str = ""
    tags: tuple[str, ...] = ()
    training: dict[str, Any] = field(default_factory=dict)
    public: bool = False  # an admin shared it: every tenant may use it as `tenant/name`

    def to_dict(self) -> dict[str, Any]:
        """JSON-able public view: `id` is the name clients put in `model`; the file address stays internal. Nested
        values (config, training) are the record's own, not copies: `dataclasses.asdict` deep-copied them, 19x slower,
        which was most of an unpaged listing's time (2.8 of ~14 s for 100k records)."""
        data = {name: getattr(self, name) for name in _RECORD_FIELDS}
        data["tags"] = list(self.tags)
        data["id"] = self.name
        return data


_RECORD_FIELDS = tuple(f.name for f in fields(InterventionRecord) if f.name != "file_sha256")

@dataclass(frozen=True)
class TrainingFileRecord:
    """One uploaded training file (OpenAI's `/v1/files`); its bytes are stored beside it by the backend."""

    id: str  # "file-<24 hex>"
    tenant: str
    filename: str
    purpose: str
    size_bytes: int
    created_at: int  # unix seconds, as OpenAI's file objects have it
