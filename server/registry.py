"""The intervention registry: the server's view of the store, plus decoded interventions kept in host memory.

Resolving a name returns an `InterventionRef` pinned to one exact version (its artifact digest): a request keeps
the version it started with even if the name is replaced or deleted meanwhile (hot swap). Decoded artifacts are
cached by digest (content-addressed, so entries never go stale), and the current version of each name is cached
too: every write through this registry updates that cache in the same call, and on a shared (PostgreSQL) store
other replicas' writes reach it as change notifications within milliseconds (`store.subscribe`), so a request on
a known name costs a dict lookup, not a database query. Uploads of either format end up as a validated
native artifact in the store. All methods block (disk, decoding): handlers call them through a threadpool.

Names belong to tenants: every method takes the tenant, caches are keyed by (tenant, name), and another tenant's
intervention is reachable only when an admin marked it public (`get_visible`, which every read of another tenant's
name or version goes through). Every write passes the tenant's storage quota (interventions and bytes) to the
store, which checks it in the write's own transaction.

The registry owns the `model` string: the base model's id, `name`, `owner/name`, and either with `@N` to pin
version N (`lookup`), and up to four of those joined by `+` (a composition, server.composition: each part resolves
as it would alone). Anything it cannot resolve raises InterventionNotFoundError or InvalidNameError, which callers
turn into one 404 that never says whether another tenant's name or version exists.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from adapters_store import (
    ArtifactStore,
    InterventionNotFoundError,
    InterventionRecord,
    StorageQuota,
    validate_name,
    validate_tenant,
)
from adapters_store.jobs import JobResult
from reft_core.artifact import Artifact, encode_artifact
from reft_core.config import check_rank
from reft_core.fingerprint import ModelFingerprint
from reft_core.intervention import Intervention
from reft_core.pyreft_import import import_pyreft
from server import composition
from server.archives import unpack_archive
from server.engine.types import ComposedRef, InterventionRef
from server.settings import Settings

Limits = Callable[[str], dict[str, object]]  # tenant -> its quota overrides
# `@N`: ASCII digits, no sign or leading zero, at most 9 digits (adapters_store.MAX_VERSION): int() stays bounded
_VERSION = re.compile(r"[1-9][0-9]{0,8}")


@dataclass(frozen=True)
class ModelName:
    """An intervention named by a `model` string: whose, which name, and a pinned version (None: the current one)."""

    owner: str
    name: str
    version: int | None = None


def parse_model(model: str, tenant: str) -> ModelName:
    """`name`, `owner/name`, each optionally `@N`; names are the tenant's own unless an owner is given.

    Names cannot contain '@' or '/', so the split is unambiguous. A malformed string raises the same errors as an
    unknown name (InterventionNotFoundError, InvalidNameError).
    """
    path, at, version = model.partition("@")
    if at and not _VERSION.fullmatch(version):
        raise InterventionNotFoundError(model, tenant=tenant)
    owner, slash, name = path.rpartition("/")
    owner = validate_tenant(owner) if slash else tenant
    return ModelName(owner, validate_name(name), int(version) if at else None)


@dataclass(frozen=True)
class Target:
    """What a `model` string resolved to: the base model (`ref` None), one exact version of an intervention, or
    several applied in order (`a+b`)."""

    ref: InterventionRef | ComposedRef | None


BASE_MODEL = Target(None)


class InterventionRegistry:
    def __init__(
        self, store: ArtifactStore, fingerprint: ModelFingerprint, settings: Settings, limits: Limits = lambda _: {},
        *, base_model_id: str = "",
    ) -> None:
        self.store = store
        self.base_model_id = base_model_id  # the `model` string that means no intervention
        self.fingerprint = fingerprint
        self.settings = settings
        self._limits = limits
        self._decoded: OrderedDict[str, Intervention] = OrderedDict()
        self._current: dict[tuple[str, str], InterventionRef] = {}
        self._writes = 0  # bumped by every write; a resolve that raced a write does not cache what it read
        self._lock = threading.Lock()
        # other replicas write too on a shared store: their changes drop our cached current versions
        store.subscribe(self._forget, self._forget_all)

    def lookup_cached(self, model: str, tenant: str) -> Target | None:
        """`lookup` without I/O (safe on the event loop): the base model, or a bare own name resolved before.
        None means "call `lookup`" (pinned versions and other tenants' names are always read from the store, so a
        deleted version or an un-published name is refused at once)."""
        if model == self.base_model_id:
            return BASE_MODEL
        parts = composition.split(model)
        if parts is not None:
            composed = composition.compose(parts, self.base_model_id, lambda part: self._cached_ref(part, tenant))
            return None if composed is None else Target(composed)
        with self._lock:
            ref = self._current.get((tenant, model))  # keys are bare names: `a/b` and `a@1` never hit
        return None if ref is None else Target(ref)

    def lookup(self, model: str, tenant: str) -> Target:
        """Resolve a `model` string for `tenant` (blocking; raises InterventionNotFoundError / InvalidNameError)."""
        if model == self.base_model_id:
            return BASE_MODEL
        parts = composition.split(model)
        if parts is not None:
            return Target(composition.compose(parts, self.base_model_id, lambda part: self._single_ref(part, tenant)))
        wanted = parse_model(model, tenant)
        if wanted.owner == tenant and wanted.version is None:
            return Target(self.resolve(tenant, wanted.name))  # the cached path
        return Target(self._ref(self.get_visible(tenant, wanted.name, wanted.owner, wanted.version)))

    def record(self, model: str, tenant: str) -> InterventionRecord | None:
        """What a `model` string names, without decoding it: None for the base model, else the record the tenant
        may see (the pinned version, or the current one). Raises like `lookup`; a composed string (`a+b`) names no
        one record, so it is not found here."""
        if model == self.base_model_id:
            return None
        wanted = parse_model(model, tenant)
        return self.get_visible(tenant, wanted.name, wanted.owner, wanted.version)

    def delete_model(self, model: str, tenant: str) -> None:
        """Delete what a `model` string names, if the tenant owns it: `name` (every version) or `name@N` (that
        version, never the current one). Another tenant's name is not found, public or not."""
        wanted = parse_model(model, tenant)
        if wanted.owner != tenant:
            raise InterventionNotFoundError(wanted.name, wanted.version, tenant=wanted.owner)
        if wanted.version is None:
            self.delete(tenant, wanted.name)
        else:
            self.delete_version(tenant, wanted.name, wanted.version)

    # One part of a composed string, looked up as it would be alone (never the base model, never composed itself).
    def _cached_ref(self, model: str, tenant: str) -> InterventionRef | None:
        target = self.lookup_cached(model, tenant)
        assert target is None or isinstance(target.ref, InterventionRef)
        return None if target is None else target.ref

    def _single_ref(self, model: str, tenant: str) -> InterventionRef:
        ref = self.lookup(model, tenant).ref
        assert isinstance(ref, InterventionRef)
        return ref

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

    def get_visible(
        self, tenant: str, name: str, owner: str | None = None, version: int | None = None
    ) -> InterventionRecord:
        """A record the tenant may see: its own, or `owner`'s if public (else InterventionNotFoundError, the same
        error as for a name or version that does not exist); `version` None is the current one."""
        owner = owner or tenant
        record = self.store.get(name, owner) if version is None else self.store.get_version(name, version, owner)
        if owner != tenant and not record.public:  # the flag is read on every access: un-publishing is immediate
            raise InterventionNotFoundError(name, version, tenant=owner)
        return record

    def versions(self, tenant: str, name: str, owner: str | None = None) -> tuple[list[InterventionRecord], int]:
        """Every retained version (newest first) and the current number, under the same visibility as the name."""
        owner = owner or tenant
        history, current = self.store.versions(name, owner)
        if owner != tenant and not history[0].public:
            raise InterventionNotFoundError(name, tenant=owner)
        return history, current

    def promote(self, tenant: str, name: str, version: int) -> InterventionRecord:
        """Make one of the tenant's retained versions current again; new requests resolve it at once."""
        try:
            return self.store.promote(name, version, tenant)
        finally:
            self._forget(tenant, name)

    def delete_version(self, tenant: str, name: str, version: int) -> None:
        self.store.delete_version(name, version, tenant)  # never the current one: the current cache stays right

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

    def _forget_all(self) -> None:
        with self._lock:
            self._writes += 1
            self._current.clear()

    def quota(self, tenant: str) -> StorageQuota:
        """The tenant's storage quota (its overrides, else the server's defaults): artifacts and training files."""
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
        self, tenant: str, name: str, payload: bytes, *, description: str | None = "", replace: bool = False,
        source: str = "upload", upsert: bool = False, job: JobResult | None = None,
    ) -> InterventionRecord:
        """`replace`: the name must exist (PUT); `upsert`: it may or may not; neither: it must be new.
        `description` None keeps the current version's. `job`: the training job whose result this is."""
        try:  # the store checks the quota in the write's own transaction: concurrent uploads cannot overshoot it
            return self.store.put(
                name, payload, description=description, replace=replace, source=source, tenant=tenant,
                quota=self.quota(tenant), max_rank=self.settings.max_intervention_rank, upsert=upsert, job=job,
            )
        finally:
            self._forget(tenant, name)  # the next request resolves the new version

    def put_pyreft_archive(
        self, tenant: str, name: str, archive: bytes, *, positions: str | None, description: str | None = "",
        replace: bool = False, upsert: bool = False,
    ) -> InterventionRecord:
        with unpack_archive(archive, self.settings) as directory:
            intervention = import_pyreft(directory, positions=positions or self._positions_of(tenant, name))
        # before encoding: a refused rank costs no artifact (the store checks it again for every upload)
        check_rank(intervention.config.rank, intervention.hidden_size, self.settings.max_intervention_rank)
        payload, _ = encode_artifact(intervention, self.fingerprint, {"imported_from": "pyreft"})
        return self.put_artifact(tenant, name, payload, description=description, replace=replace,
                                 source="pyreft-import", upsert=upsert)

    def _positions_of(self, tenant: str, name: str) -> str:
        """pyreft saves do not record positions: a replace that gives none keeps the current version's ("l1" for
        a new name). Only a default: the write itself still checks whether the name may be created or replaced."""
        try:
            return str(self.store.get(name, tenant).config.get("positions", "l1"))
        except InterventionNotFoundError:
            return "l1"

    def put_intervention(
        self, tenant: str, name: str, intervention: Intervention, training: dict, *, description: str | None = "",
        replace: bool = False, upsert: bool = False, job: JobResult | None = None,
    ) -> InterventionRecord:
        payload, _ = encode_artifact(intervention, self.fingerprint, training)
        return self.put_artifact(tenant, name, payload, description=description, replace=replace, source="training",
                                 upsert=upsert, job=job)
