"""Typed FastAPI dependencies: the services a route needs, or a clear 503 while the model is still loading."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from adapters_store import ArtifactStore
from reft_core.fingerprint import ModelFingerprint
from server.engine.remote import EngineHandle
from server.errors import APIError
from server.generation import GenerationService
from server.registry import InterventionRegistry
from server.settings import Settings
from server.training import TrainingManager


@dataclass(frozen=True)
class Services:
    """Everything built from the loaded model; one instance per app, created by the app factory's loader."""

    settings: Settings
    model_id: str
    fingerprint: ModelFingerprint
    tokenizer: Any
    engine: EngineHandle
    store: ArtifactStore
    registry: InterventionRegistry
    generation: GenerationService
    training: TrainingManager
    created: int


def services(request: Request) -> Services:
    found: Services | None = getattr(request.app.state, "services", None)
    if found is None:
        error = getattr(request.app.state, "load_error", None)
        message = f"the server failed to start: {error}" if error else "the model is still loading; retry shortly"
        raise APIError(503, message, type="server_error", code="not_ready")
    return found


def generation_service(request: Request) -> GenerationService:
    return services(request).generation


def registry(request: Request) -> InterventionRegistry:
    return services(request).registry
