"""adapters_store: where interventions, tenants and jobs live between requests and across restarts.

`ArtifactStore` is the one entry point for interventions: it validates artifacts with `reft_core.artifact` before
writing and keeps every version on a backend: a directory (SQLite index + content-addressed files, the default) or
a PostgreSQL database shared by replicas (`adapters_store.postgres`, needs the `[shared]` extra). Its
`training_files` (`TrainingFileStore`) keeps the tenants' uploaded fine-tuning files on the same backend, under the
same quota. `open_tenants` and `open_jobs` pick the same place for tenants/keys and training jobs. Imports go one
way: this package uses `reft_core` and knows nothing of HTTP or the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
    TrainingFileNotFoundError,
    VersionIsCurrentError,
)
from adapters_store.records import (
    MAX_VERSION,
    SOURCES,
    InterventionRecord,
    StorageQuota,
    TrainingFileRecord,
    validate_name,
    validate_tenant,
)
from reft_core.lazy import lazy_attributes

# The store (and through it torch and safetensors) loads on first use, not on `import adapters_store`: the settings
# and the CLI import this package's light modules, and `reft-serve serve` starts its engine process before the
# heavy imports so that both processes import at once (see server.engine.launch).
_LAZY = {"ArtifactStore": "adapters_store.store", "StoreStats": "adapters_store.store",
         "TrainingFileStore": "adapters_store.training_files"}

if TYPE_CHECKING:
    from adapters_store.store import ArtifactStore, StoreStats
    from adapters_store.training_files import TrainingFileStore


__getattr__ = lazy_attributes(__name__, _LAZY)


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
    "TrainingFileNotFoundError",
    "TrainingFileRecord",
    "TrainingFileStore",
    "VersionIsCurrentError",
    "validate_name",
    "validate_tenant",
]
