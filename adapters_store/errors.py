"""Errors the store raises; the server maps each to an HTTP status in its error table.

Every message names the intervention (and the tenant when it is not the default) and says what would fix it.
Artifact validation errors are not wrapped: `reft_core.errors.ArtifactError` subclasses pass through unchanged.
"""

from __future__ import annotations


def _describe(name: str, tenant: str) -> str:
    return f"intervention '{name}'" + (f" of tenant '{tenant}'" if tenant != "default" else "")


class StoreError(Exception):
    """Base class for store errors."""


class InterventionNotFoundError(StoreError):
    def __init__(self, name: str, version: int | None = None, tenant: str = "default") -> None:
        what = _describe(name, tenant) + (f" version {version}" if version is not None else "")
        super().__init__(f"{what} does not exist")
        self.name, self.version, self.tenant = name, version, tenant


class InterventionExistsError(StoreError):
    def __init__(self, name: str, tenant: str = "default") -> None:
        super().__init__(f"{_describe(name, tenant)} already exists; pass replace=true (or use PUT) to store a new "
                         "version of it, or pick another name")
        self.name, self.tenant = name, tenant


class VersionIsCurrentError(StoreError):
    """Deleting the version a name currently serves: promote another one first, or delete the whole name."""

    def __init__(self, name: str, version: int, tenant: str = "default") -> None:
        super().__init__(f"version {version} is the current version of {_describe(name, tenant)}; promote another "
                         "version first, or delete the intervention")
        self.name, self.version, self.tenant = name, version, tenant


class InvalidNameError(StoreError, ValueError):
    """A name (or tenant) outside `[a-z0-9][a-z0-9._-]{0,63}`, or one containing `..`."""


class InvalidMetadataError(StoreError, ValueError):
    """Record metadata out of bounds: description too long, bad tags, unknown source."""


class ArtifactUnavailableError(StoreError):
    """The record exists but its artifact cannot be served (file missing, corrupt on disk)."""


class StoreWriteError(StoreError):
    """Writing failed (disk full, read-only store, ...); nothing already stored was damaged."""


class StoreUnavailableError(StoreWriteError):
    """The store's database cannot be reached right now (a restart, a network fault); retrying later works."""


class QuotaExceededError(StoreError):
    """A write would take the tenant past its storage quota (interventions or bytes); nothing was stored."""
