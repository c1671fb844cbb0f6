"""The app factory: builds the FastAPI app from `Settings`, loads the model and wires services in the lifespan.

The model loads in a background thread so `/health` answers (and `/ready` says "loading") during the ~seconds it
takes; routes that need the model answer 503 until it is ready. Passing `base_model` (tests, embedding) loads
synchronously instead.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from adapters_store import ArtifactStore
from adapters_store.jobs import open_jobs
from adapters_store.tenants import TenantStore, open_tenants
from reft_core.base_model import BaseModel, load_base_model, load_tokenizer, model_id_for
from reft_core.fingerprint import ModelFingerprint
from reft_core.frozen_context import ModelDims
from server.auth import AuthenticateFirst, tenant_limits
from server.dependencies import Services
from server.engine.engine import Engine
from server.engine.launch import EngineLaunch, engine_settings, spec_for
from server.engine.remote import EngineHandle, RemoteEngine
from server.errors import install_error_handlers
from server.generation import GenerationService
from server.job_worker import JobWorker
from server.limits import BodySizeLimit
from server.metrics import Metrics
from server.openapi import document_errors
from server.playground import install_playground
from server.quotas import Limiter, RateLimiter
from server.registry import InterventionRegistry
from server.request_context import RequestContext
from server.routes import admin, completions, files, fine_tuning, health, interventions, models, trainings, versions
from server.settings import Settings
from server.timed_store import TimedStore
from server.tracing import Tracing, build_tracing
from server.training import TrainingManager

log = logging.getLogger("reft_serve.app")


@dataclass(frozen=True)
class StartedEngine:
    engine: EngineHandle
    tokenizer: Any
    fingerprint: ModelFingerprint
    dims: ModelDims
    base_model_id: str  # the id clients use for the bare model (unless settings.model_id overrides it)
    capacity: int | None = None  # requests running or queued at once; None: settings' max_running + max_waiting
    training_unavailable: str | None = None  # why this engine cannot train (POST /v1/trainings answers 501)
    # whether this process's engine runs jobs it claims from a shared (PostgreSQL) queue; the Ray ingress only
    # queues them: its engine replicas claim and run them
    claims_jobs: bool = True


# Starts the engine for the app factory's loader (the default is `start_engine`; Ray Serve passes its own).
EngineStarter = Callable[[Settings, Metrics], StartedEngine]


def open_artifact_store(settings: Settings, fingerprint: ModelFingerprint) -> ArtifactStore:
    """The store the settings select (the API process and every engine replica open it the same way)."""
    return ArtifactStore(settings.state_location("store"), fingerprint,
                         keep_versions=settings.max_versions_per_intervention)


def start_engine(settings: Settings, base: BaseModel | None, metrics: Metrics,
                 launched: EngineLaunch | None = None) -> StartedEngine:
    """Start the engine: a thread beside the event loop for a given model object (tests, embedding), else a
    process of its own (`engine_process`, the default for `reft-serve serve`) that loads the weights itself; the CLI
    passes that process `launched` already, before its own heavy imports (see `server.engine.launch`)."""
    if base is None and settings.engine_process:
        remote = RemoteEngine(launched or spec_for(settings), metrics)
        try:
            info = remote.start()
            assert info.model_dir is not None
            tokenizer = load_tokenizer(info.model_dir)
        except Exception:
            remote.stop()
            raise
        return StartedEngine(remote, tokenizer, info.fingerprint, info.dims, model_id_for(settings.model))
    base = base or load_base_model(
        settings.model, device=settings.device, dtype=settings.dtype, cache_dir=settings.model_cache_dir
    )
    engine = Engine(base.model, base.tokenizer, engine_settings(settings), metrics)
    engine.start()
    return StartedEngine(engine, base.tokenizer, base.fingerprint, ModelDims.from_model(base.model), base.model_id)


def build_services(
    settings: Settings, started: StartedEngine, tenants: TenantStore, rate_limiter: Limiter,
    metrics: Metrics | None = None, tracing: Tracing | None = None,
) -> Services:
    engine, tokenizer, fingerprint, dims = started.engine, started.tokenizer, started.fingerprint, started.dims
    metrics, tracing = metrics or Metrics(), tracing or Tracing()
    store: ArtifactStore = TimedStore(  # type: ignore[assignment] - the store's interface, every call measured
        open_artifact_store(settings, fingerprint), metrics, tracing,
    )
    if not store.read_only:  # files a crash left between a commit and their removal, or older builds never removed
        # beside serving, not before it: gc lists every stored file (seconds at 100k personas), and a file it has
        # not removed yet is harmless (nothing references it); writes wait for it (the store's write lock)
        threading.Thread(target=_collect_garbage, args=(store,), name="store-gc", daemon=True).start()
    model_id = settings.model_id or started.base_model_id
    registry = InterventionRegistry(store, fingerprint, settings, lambda tenant: tenant_limits(tenants, tenant),
                                    base_model_id=model_id)
    generation = GenerationService(engine, tokenizer, registry, settings, model_id, rate_limiter,
                                   capacity=started.capacity, metrics=metrics, tracing=tracing)
    jobs = open_jobs(settings.state_location("jobs"), lease_s=settings.job_lease_s,
                     max_attempts=settings.job_max_attempts)
    training = TrainingManager(engine, registry, tokenizer, jobs, settings, dims,
                               unavailable=started.training_unavailable, metrics=metrics)
    if jobs.shared and started.training_unavailable is None and started.claims_jobs:  # it runs queued jobs
        training.worker = JobWorker(training)
    return Services(
        settings=settings, model_id=model_id, fingerprint=fingerprint, tokenizer=tokenizer, engine=engine,
        store=store, registry=registry, generation=generation, training=training, created=int(time.time()),
    )


def _collect_garbage(store: ArtifactStore) -> None:
    try:
        removed = store.gc()
    except Exception:  # noqa: BLE001 - the next start tries again; serving does not depend on it
        log.warning("could not remove unreferenced artifact files", exc_info=True)
        return
    if removed:
        log.info("removed unreferenced artifact files", extra={"files": removed})


def make_rate_limiter(settings: Settings, metrics: Metrics) -> Limiter:
    """Per-process buckets, or buckets in Redis shared by every replica (`limits_store`)."""
    if settings.limits_store is None:
        return RateLimiter()
    from server.shared_limits import RedisRateLimiter  # redis is an optional dependency

    metrics.registry.register(metrics.limits_store_up)  # only a server with a limits store reports it
    return RedisRateLimiter(settings.limits_store, metrics.limits_store_up, prefix=settings.limits_store_prefix,
                            fail_closed=settings.limits_fail_closed)


def create_app(
    settings: Settings, *, base_model: BaseModel | None = None, start: EngineStarter | None = None,
    span_exporter: Any = None,
) -> FastAPI:
    """`start`: how the engine starts (default: `start_engine`, a thread or a process of its own); `span_exporter`:
    an OpenTelemetry span exporter to trace into (tests), else `settings.otlp_endpoint`."""
    metrics = Metrics()
    tracing = build_tracing(settings.otlp_endpoint, span_exporter)
    tenants = open_tenants(settings.state_location(""))
    rate_limiter = make_rate_limiter(settings, metrics)

    def load() -> None:
        started = time.perf_counter()
        started_engine: StartedEngine | None = None
        try:
            started_engine = (start(settings, metrics) if start is not None
                              else start_engine(settings, base_model, metrics))
            app.state.services = build_services(settings, started_engine, tenants, rate_limiter, metrics,
                                                 tracing)
        except Exception as exc:  # noqa: BLE001 - reported on /ready and in 503 bodies, not a crash loop
            log.exception("failed to load the model")
            app.state.load_error = f"{type(exc).__name__}: {exc}"
            if started_engine is not None:
                started_engine.engine.stop()
            return
        log.info("ready", extra={"model": app.state.services.model_id, "load_s": round(time.perf_counter() - started, 2)})

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.get_running_loop().run_in_executor(None, load)
        if base_model is not None:
            await loader
        try:
            yield
        finally:
            await loader
            services: Services | None = app.state.services
            if services is not None:
                services.training.close()  # claim nothing more; a job running here is released as the engine stops
                services.engine.stop()
            if settings.postgres_store:  # return the connections (a local store's files need no closing)
                if services is not None:
                    services.store.close()
                    services.training.jobs.close()
                tenants.close()
            tracing.shutdown()

    app = FastAPI(
        title="reft-serve",
        version="0.1.0",
        description="Serve many ReFT interventions from one frozen language model (OpenAI-compatible).",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.state.tracing = tracing
    app.state.settings = settings
    app.state.tenants = tenants
    app.state.rate_limiter = rate_limiter
    app.state.services = None
    app.state.store_gauges_at = float("-inf")  # when /metrics last counted the store (server.routes.health)
    app.state.load_error = None
    app.state.draining = False
    app.state.drain = lambda: _drain(app)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, settings=settings)
    app.add_middleware(AuthenticateFirst, settings=settings, tenants=tenants, metrics=metrics)
    app.add_middleware(RequestContext, metrics=metrics, tracing=tracing)  # outermost: every answer gets the id
    for module in (completions, models, interventions, versions, trainings, files, fine_tuning, admin, health):
        app.include_router(module.router)
    document_errors(app)  # after every router: the schema lists the statuses each route can send
    install_playground(app)
    if not settings.auth_enabled and settings.auth == "auto":
        log.info("auth is off: bound to a loopback address (every caller is the admin of tenant 'default')")
    elif settings.auth_enabled and settings.admin_key is None:
        log.warning("auth is on but no admin key is set: manage tenants and keys with `reft-serve admin`")
    return app


def _drain(app: FastAPI) -> None:
    """Stop admitting (SIGTERM): /ready turns false, new generations get 503, queued ones fail, running ones finish."""
    app.state.draining = True
    services: Services | None = app.state.services
    if services is not None:
        services.generation.draining = True
        services.engine.drain()
    log.info("draining: no new requests are admitted")
