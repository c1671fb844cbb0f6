"""adapters_store: where interventions live between requests and across restarts (SQLite index + files)."""

from adapters_store.errors import (
    ArtifactUnavailableError,
    InterventionExistsError,
    InterventionNotFoundError,
    InvalidNameError,
    StoreError,
    StoreWriteError,
)
from adapters_store.records import InterventionRecord, validate_name
from adapters_store.store import ArtifactStore, StoreStats

__all__ = [
    "ArtifactStore",
    "ArtifactUnavailableError",
    "InterventionExistsError",
    "InterventionNotFoundError",
    "InterventionRecord",
    "InvalidNameError",
    "StoreError",
    "StoreStats",
    "StoreWriteError",
    "validate_name",
]
