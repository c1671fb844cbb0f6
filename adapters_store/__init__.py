"""adapters_store: where interventions live between requests and across restarts (SQLite index + files).

`ArtifactStore` is the one entry point: it validates artifacts with `reft_core.artifact` before writing, stores
them content-addressed under its root, and keeps the version history in a SQLite index. Imports go one way: this
package uses `reft_core` and knows nothing of HTTP or the server.
"""

from adapters_store.errors import (
    ArtifactUnavailableError,
    InterventionExistsError,
    InterventionNotFoundError,
    InvalidMetadataError,
    InvalidNameError,
    QuotaExceededError,
    StoreError,
    StoreWriteError,
    VersionIsCurrentError,
)
from adapters_store.records import (
    MAX_VERSION,
    SOURCES,
    InterventionRecord,
    StorageQuota,
    validate_name,
    validate_tenant,
)
from adapters_store.store import ArtifactStore, StoreStats

__all__ = [
    "MAX_VERSION",
    "SOURCES",
    "ArtifactStore",
    "ArtifactUnavailableError",
    "InterventionExistsError",
    "InterventionNotFoundError",
    "InterventionRecord",
    "InvalidMetadataError",
    "InvalidNameError",
    "QuotaExceededError",
    "StorageQuota",
    "StoreError",
    "StoreStats",
    "StoreWriteError",
    "VersionIsCurrentError",
    "validate_name",
    "validate_tenant",
]
