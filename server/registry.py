"""The intervention registry: the server's view of the store, plus decoded interventions kept in host memory.

Resolving a name returns an `InterventionRef` pinned to one exact version (its artifact digest): a request keeps
the version it started with even if the name is replaced or deleted meanwhile (hot swap). Decoded artifacts are
cached by digest (content-addressed, so entries never go stale), and the current version of each name is cached
too: every write goes through this registry (the server is the store's only writer), which updates that cache in
the same call, so a request on a known name costs a dict lookup, not a database query. Uploads of either format end up as a validated
native artifact in the store. All methods block (disk, decoding): handlers call them through a threadpool.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from adapters_store import ArtifactStore, InterventionRecord
from reft_core.artifact import Artifact, encode_artifact
from reft_core.fingerprint import ModelFingerprint
from reft_core.intervention import Intervention
from reft_core.pyreft_import import import_pyreft
from server.archives import unpack_archive
from server.engine.types import InterventionRef
from server.settings import Settings


class InterventionRegistry:
    def __init__(self, store: ArtifactStore, fingerprint: ModelFingerprint, settings: Settings) -> None:
        self.store = store
        self.fingerprint = fingerprint
        self.settings = settings
        self._decoded: OrderedDict[str, Intervention] = OrderedDict()
        self._current: dict[str, InterventionRef] = {}
        self._writes = 0  # bumped by every write; a resolve that raced a write does not cache what it read
        self._lock = threading.Lock()

    def cached(self, name: str) -> InterventionRef | None:
        """The current version of `name` if it was resolved before (no I/O; safe on the event loop)."""
        with self._lock:
            return self._current.get(name)

    def resolve(self, name: str) -> InterventionRef:
        """The current version of `name`, decoded (raises InterventionNotFoundError if unknown)."""
        with self._lock:
            writes_before = self._writes
        record = self.store.get(name)
        ref = InterventionRef(name=record.name, key=record.digest, intervention=self._decode(record))
        with self._lock:
            if self._writes == writes_before and len(self._current) < self.settings.decoded_intervention_cache:
                self._current[name] = ref
        return ref

    def delete(self, name: str) -> None:
        try:
            self.store.delete(name)
        finally:
            self._forget(name)

    def _forget(self, name: str) -> None:
        with self._lock:
            self._writes += 1
            self._current.pop(name, None)

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
        self, name: str, payload: bytes, *, description: str = "", replace: bool = False, source: str = "upload"
    ) -> InterventionRecord:
        try:
            return self.store.put(name, payload, description=description, replace=replace, source=source)
        finally:
            self._forget(name)  # the next request resolves the new version

    def put_pyreft_archive(
        self, name: str, archive: bytes, *, positions: str, description: str = "", replace: bool = False
    ) -> InterventionRecord:
        with unpack_archive(archive, self.settings) as directory:
            intervention = import_pyreft(directory, positions=positions)
        payload, _ = encode_artifact(intervention, self.fingerprint, {"imported_from": "pyreft"})
        return self.put_artifact(name, payload, description=description, replace=replace, source="pyreft-import")

    def put_intervention(
        self, name: str, intervention: Intervention, training: dict, *, description: str = "", replace: bool = False
    ) -> InterventionRecord:
        payload, _ = encode_artifact(intervention, self.fingerprint, training)
        return self.put_artifact(name, payload, description=description, replace=replace, source="training")
