"""The app factory: builds the FastAPI app from `Settings`, loads the model and wires services in the lifespan.

The model loads in a background thread so `/health` answers (and `/ready` says "loading") during the ~seconds it
takes; routes that need the model answer 503 until it is ready. Passing `base_model` (tests, embedding) loads
synchronously instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from adapters_store import ArtifactStore
from adapters_store.jobs import JobStore
from adapters_store.tenants import TenantStore
from reft_core.base_model import BaseModel, load_base_model
from server.auth import tenant_limits
from server.dependencies import Services
from server.engine.engine import Engine, EngineSettings
from server.errors import install_error_handlers
from server.generation import GenerationService
from server.limits import BodySizeLimit
from server.metrics import Metrics
from server.quotas import RateLimiter
from server.registry import InterventionRegistry
from server.routes import admin, completions, health, interventions, models, trainings, versions
from server.settings import Settings
from server.training import TrainingManager

log = logging.getLogger("reft_serve.app")


def build_services(
    settings: Settings, base: BaseModel, metrics: Metrics, tenants: TenantStore, rate_limiter: RateLimiter
) -> Services:
    store = ArtifactStore(settings.data_dir / "store", base.fingerprint,
                          keep_versions=settings.max_versions_per_intervention)
    if not store.read_only:  # files a crash left between a commit and their removal, or older builds never removed
        removed = store.gc()
        if removed:
            log.info("removed unreferenced artifact files", extra={"files": removed})
    engine = Engine(
        base.model,
        base.tokenizer,
        EngineSettings(
            max_running=settings.max_running,
            max_prefill_tokens=settings.max_prefill_tokens,
            resident_interventions=settings.resident_interventions,
            training_share=settings.training_share,
        ),
        metrics,
    )
    model_id = settings.model_id or base.model_id
    registry = InterventionRegistry(store, base.fingerprint, settings, lambda tenant: tenant_limits(tenants, tenant),
                                    base_model_id=model_id)
    generation = GenerationService(engine, base.tokenizer, registry, settings, model_id, rate_limiter)
    training = TrainingManager(
        engine, registry, base.tokenizer, JobStore(settings.data_dir / "jobs"), settings,
        num_layers=base.num_layers, hidden_size=base.hidden_size,
    )
    engine.start()
    return Services(
        settings=settings, model_id=model_id, fingerprint=base.fingerprint, tokenizer=base.tokenizer, engine=engine,
        store=store, registry=registry, generation=generation, training=training, created=int(time.time()),
    )


def create_app(settings: Settings, *, base_model: BaseModel | None = None) -> FastAPI:
    metrics = Metrics()
    tenants = TenantStore(settings.data_dir)
    rate_limiter = RateLimiter()

    def load() -> None:
        started = time.perf_counter()
        try:
            base = base_model or load_base_model(
                settings.model, device=settings.device, dtype=settings.dtype, cache_dir=settings.model_cache_dir
            )
            app.state.services = build_services(settings, base, metrics, tenants, rate_limiter)
        except Exception as exc:  # noqa: BLE001 - reported on /ready and in 503 bodies, not a crash loop
            log.exception("failed to load the model")
            app.state.load_error = f"{type(exc).__name__}: {exc}"
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
                services.engine.stop()

    app = FastAPI(
        title="reft-serve",
        version="0.1.0",
        description="Serve many ReFT interventions from one frozen language model (OpenAI-compatible).",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.tenants = tenants
    app.state.rate_limiter = rate_limiter
    app.state.services = None
    app.state.load_error = None
    app.state.draining = False
    app.state.drain = lambda: _drain(app)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, settings=settings)
    for module in (completions, models, interventions, versions, trainings, admin, health):
        app.include_router(module.router)
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
