"""Intervention records (store metadata) and the name rules."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from adapters_store.errors import InvalidNameError

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"invalid intervention name {name!r:.80}: use 1-64 characters from a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


@dataclass(frozen=True)
class InterventionRecord:
    name: str
    version: int
    tenant: str
    digest: str  # the artifact's content digest ("sha256:..."), also its identity in the engine
    file_sha256: str  # hash of the stored file's bytes, checked on every read
    size_bytes: int
    base_model_id: str
    config: dict[str, Any]
    created_at: str
    source: str = "upload"
    description: str = ""
    tags: tuple[str, ...] = ()
    training: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tags"] = list(self.tags)
        data.pop("file_sha256")
        data["id"] = self.name
        return data
