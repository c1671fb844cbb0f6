"""adapters_store: where interventions, tenants and jobs live between requests and across restarts.

`ArtifactStore` is the one entry point for interventions: it validates artifacts with `reft_core.artifact` before
writing and keeps every version on a backend: a directory (SQLite index + content-addressed files, the default) or
a PostgreSQL database shared by replicas (`adapters_store.postgres`, needs the `[shared]` extra). `open_tenants`
and `open_jobs` pick the same place for tenants/keys and training jobs. Imports go one way: this package uses
`reft_core` and knows nothing of HTTP or the server.
"""

from adapters_store.errors import (
    ArtifactUnavailableError,
    InterventionExistsError,
    InterventionNotFoundError,
    InvalidMetadataError,
    InvalidNameError,
    QuotaExceededError,
    StoreError,
    StoreUnavailableError,
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
    "StoreUnavailableError",
    "StoreWriteError",
    "VersionIsCurrentError",
    "validate_name",
    "validate_tenant",
]
