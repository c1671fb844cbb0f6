"""Errors the store raises; the server maps each to an HTTP status in its error table."""

from __future__ import annotations


class StoreError(Exception):
    """Base class for store errors."""


class InterventionNotFoundError(StoreError):
    def __init__(self, name: str, version: int | None = None) -> None:
        what = f"intervention '{name}'" + (f" version {version}" if version is not None else "")
        super().__init__(f"{what} does not exist")
        self.name = name


class InterventionExistsError(StoreError):
    def __init__(self, name: str) -> None:
        super().__init__(f"intervention '{name}' already exists; use PUT to replace it with a new version")
        self.name = name


class InvalidNameError(StoreError, ValueError):
    """A name outside `[a-z0-9][a-z0-9._-]{0,63}` (or containing `..`)."""


class ArtifactUnavailableError(StoreError):
    """The record exists but its artifact cannot be served (missing file, corrupt on disk)."""


class StoreWriteError(StoreError):
    """Writing failed (disk full, read-only store, ...); nothing already stored was damaged."""
