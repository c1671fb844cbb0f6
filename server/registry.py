"""The intervention registry: the server's view of the store, plus decoded interventions kept in host memory.

Resolving a name returns an `InterventionRef` pinned to one exact version (its artifact digest): a request keeps
the version it started with even if the name is replaced or deleted meanwhile (hot swap). Decoded artifacts are
cached by digest (content-addressed, so entries never go stale), and the current version of each name is cached
too: every write goes through this registry (the server is the store's only writer), which updates that cache in
the same call, so a request on a known name costs a dict lookup, not a database query. Uploads of either format end up as a validated
native artifact in the store. All methods block (disk, decoding): handlers call them through a threadpool.

Names belong to tenants: every method takes the tenant, caches are keyed by (tenant, name), and another tenant's
intervention is reachable only when an admin marked it public (`resolve_public`). Every write passes the tenant's
storage quota (interventions and bytes) to the store, which checks it in the write's own transaction.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from adapters_store import ArtifactStore, InterventionNotFoundError, InterventionRecord, StorageQuota
from reft_core.artifact import Artifact, encode_artifact
from reft_core.config import check_rank
from reft_core.fingerprint import ModelFingerprint
from reft_core.intervention import Intervention
from reft_core.pyreft_import import import_pyreft
from server.archives import unpack_archive
from server.engine.types import InterventionRef
from server.settings import Settings

Limits = Callable[[str], dict[str, object]]  # tenant -> its quota overrides


class InterventionRegistry:
    def __init__(
        self, store: ArtifactStore, fingerprint: ModelFingerprint, settings: Settings, limits: Limits = lambda _: {}
    ) -> None:
        self.store = store
        self.fingerprint = fingerprint
        self.settings = settings
        self._limits = limits
        self._decoded: OrderedDict[str, Intervention] = OrderedDict()
        self._current: dict[tuple[str, str], InterventionRef] = {}
        self._writes = 0  # bumped by every write; a resolve that raced a write does not cache what it read
        self._lock = threading.Lock()

    def cached(self, tenant: str, name: str) -> InterventionRef | None:
        """The current version of the tenant's `name` if it was resolved before (no I/O; safe on the event loop)."""
        with self._lock:
            return self._current.get((tenant, name))

    def resolve(self, tenant: str, name: str) -> InterventionRef:
        """The current version of the tenant's `name`, decoded (raises InterventionNotFoundError if unknown)."""
        with self._lock:
            writes_before = self._writes
        record = self.store.get(name, tenant)
        ref = self._ref(record)
        with self._lock:
            if self._writes == writes_before and len(self._current) < self.settings.decoded_intervention_cache:
                self._current[(tenant, name)] = ref
        return ref

    def resolve_public(self, owner: str, name: str) -> InterventionRef:
        """Another tenant's intervention, only if it is public; otherwise exactly as if it did not exist."""
        record = self.store.get(name, owner)
        if not record.public:
            raise InterventionNotFoundError(name, tenant=owner)
        return self._ref(record)

    def get_visible(self, tenant: str, name: str, owner: str | None = None) -> InterventionRecord:
        """A record the tenant may see: its own, or `owner`'s if public (else InterventionNotFoundError)."""
        if owner is None or owner == tenant:
            return self.store.get(name, tenant)
        record = self.store.get(name, owner)
        if not record.public:
            raise InterventionNotFoundError(name, tenant=owner)
        return record

    def set_public(self, tenant: str, name: str, public: bool) -> InterventionRecord:
        return self.store.set_public(name, public, tenant)

    def _ref(self, record: InterventionRecord) -> InterventionRef:
        label = record.name if record.tenant == "default" else f"{record.tenant}/{record.name}"
        return InterventionRef(name=label, key=record.digest, intervention=self._decode(record))

    def delete(self, tenant: str, name: str) -> None:
        try:
            self.store.delete(name, tenant)
        finally:
            self._forget(tenant, name)

    def _forget(self, tenant: str, name: str) -> None:
        with self._lock:
            self._writes += 1
            self._current.pop((tenant, name), None)

    def _quota(self, tenant: str) -> StorageQuota:
        limits = self._limits(tenant)
        return StorageQuota(max_interventions=self.settings.limit("max_interventions_per_tenant", limits),
                            max_bytes=self.settings.limit("max_bytes_per_tenant", limits))

    def _decode(self, record: InterventionRecord) -> Intervention:
        with self._lock:
            cached = self._decoded.get(record.digest)
            if cached is not None:
                self._decoded.move_to_end(record.digest)
                return cached
        artifact: Artifact = self.store.load(record)  # verifies digest and base model
        with self._lock:
            self._decoded[record.digest] = artifact.intervention
            while len(self._decoded) > self.settings.decoded_intervention_cache:
                self._decoded.popitem(last=False)
        return artifact.intervention

    def put_artifact(
        self, tenant: str, name: str, payload: bytes, *, description: str = "", replace: bool = False,
        source: str = "upload",
    ) -> InterventionRecord:
        try:  # the store checks the quota in the write's own transaction: concurrent uploads cannot overshoot it
            return self.store.put(
                name, payload, description=description, replace=replace, source=source, tenant=tenant,
                quota=self._quota(tenant), max_rank=self.settings.max_intervention_rank,
            )
        finally:
            self._forget(tenant, name)  # the next request resolves the new version

    def put_pyreft_archive(
        self, tenant: str, name: str, archive: bytes, *, positions: str, description: str = "", replace: bool = False
    ) -> InterventionRecord:
        with unpack_archive(archive, self.settings) as directory:
            intervention = import_pyreft(directory, positions=positions)
        # before encoding: a refused rank costs no artifact (the store checks it again for every upload)
        check_rank(intervention.config.rank, intervention.hidden_size, self.settings.max_intervention_rank)
        payload, _ = encode_artifact(intervention, self.fingerprint, {"imported_from": "pyreft"})
        return self.put_artifact(tenant, name, payload, description=description, replace=replace, source="pyreft-import")

    def put_intervention(
        self, tenant: str, name: str, intervention: Intervention, training: dict, *, description: str = "",
        replace: bool = False,
    ) -> InterventionRecord:
        payload, _ = encode_artifact(intervention, self.fingerprint, training)
        return self.put_artifact(tenant, name, payload, description=description, replace=replace, source="training")
