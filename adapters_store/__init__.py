"""adapters_store: where interventions live between requests and across restarts (SQLite index + files).

`ArtifactStore` is the one entry point: it validates artifacts with `reft_core.artifact` before writing, stores
them content-addressed under its root, and keeps the version history in a SQLite index. Its `training_files`
(`TrainingFileStore`) holds the tenants' uploaded fine-tuning files in the same index, under the same quota.
Imports go one way: this package uses `reft_core` and knows nothing of HTTP or the server.
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
    TrainingFileNotFoundError,
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
from adapters_store.training_files import TrainingFileRecord, TrainingFileStore

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
    "TrainingFileNotFoundError",
    "TrainingFileRecord",
    "TrainingFileStore",
    "VersionIsCurrentError",
    "validate_name",
    "validate_tenant",
]
