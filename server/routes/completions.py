"""`POST /v1/chat/completions` and `POST /v1/completions` (OpenAI-compatible, with SSE streaming)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.auth import caller
from server.dependencies import generation_service
from server.engine.types import FinishReason, GenerationEvent
from server.errors import APIError, error_body
from server.generation import Caller, GenerationService, PreparedRequest, error_for, raise_for_error
from server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields

router = APIRouter(prefix="/v1", tags=["generation"])


def _finish(reason: FinishReason | None) -> str | None:
    return None if reason is None else ("length" if reason is FinishReason.LENGTH else "stop")


def _usage(event: GenerationEvent) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


async def _collect(service: GenerationService, prepared: PreparedRequest, request: Request) -> tuple[str, GenerationEvent]:
    """Run to completion; if the client hangs up first, cancel at once (its batch row is freed) and answer 499.

    The hang-up is watched on its own task, not between events: a request that is generating gets an event every
    decode step, so a check that waits for a pause in events would not run until max_tokens."""
    generating = asyncio.ensure_future(_gather(service, prepared))
    watching = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({generating, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (generating, watching):
            task.cancel()
        await asyncio.gather(generating, watching, return_exceptions=True)  # the generator's cleanup cancels the row
    if generating.cancelled():  # nobody reads this answer; 499 is nginx's "client closed request" in the logs
        raise APIError(499, "the client closed the connection", code="client_closed_request")
    return generating.result()  # or its error (504, 503, ...)


async def _gather(service: GenerationService, prepared: PreparedRequest) -> tuple[str, GenerationEvent]:
    parts: list[str] = []
    events = service.events(prepared)
    try:
        async for event in events:
            parts.append(event.text)
            if event.finish_reason is not None:
                raise_for_error(event)
                return "".join(parts), event
        raise AssertionError("the event stream ended without a final event")
    finally:
        await events.aclose()


async def _disconnected(request: Request) -> None:
    """Return once the client has gone. The body was read in full before the handler ran, so the only message
    left for `receive` to deliver is `http.disconnect`."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass(frozen=True)
class _Envelope:
    """The fields every response object and stream chunk of one completion shares."""

    id: str
    object: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def wrap(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": choices}
        return body if usage is None else body | {"usage": usage}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(
    service: GenerationService,
    prepared: PreparedRequest,
    body: SamplingFields,
    envelope: _Envelope,
    choice: Callable[[GenerationEvent, bool], dict[str, Any]],
) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = service.events(prepared)
    try:
        first = True
        async for event in events:
            if event.finish_reason is FinishReason.ERROR:
                error = error_for(event)
                yield _sse(error_body(error.message, error.type, error.code))
                break
            if event.text or first or event.finish_reason is not None:
                yield _sse(envelope.wrap([choice(event, first)]))
                first = False
            if event.finish_reason is not None and include_usage:
                yield _sse(envelope.wrap([], _usage(event)))
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()


@router.post("/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, who: Caller = Depends(caller),
    service: GenerationService = Depends(generation_service),
) -> JSONResponse | StreamingResponse:
    """Chat completion; `model` is the base model id, an intervention name, or `tenant/name` of a public one."""
    prepared = await service.prepare_chat(body, who)
    if body.stream:
        def chunk(event: GenerationEvent, first: bool) -> dict[str, Any]:
            delta: dict[str, Any] = {"role": "assistant", "content": event.text} if first else {"content": event.text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": _finish(event.finish_reason)}

        envelope = _Envelope(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion.chunk", body.model)
        return StreamingResponse(_stream(service, prepared, body, envelope, chunk), media_type="text/event-stream")
    text, final = await _collect(service, prepared, request)
    envelope = _Envelope(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", body.model)
    message = {"role": "assistant", "content": text}
    return JSONResponse(envelope.wrap(
        [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(final.finish_reason)}],
        _usage(final),
    ))


@router.post("/completions", response_model=None)
async def create_completion(
    body: CompletionRequest, request: Request, who: Caller = Depends(caller),
    service: GenerationService = Depends(generation_service),
) -> JSONResponse | StreamingResponse:
    """Text completion; `model` is the base model id, an intervention name, or `tenant/name` of a public one."""
    prepared = await service.prepare_completion(body, who)
    envelope = _Envelope(f"cmpl-{uuid.uuid4().hex}", "text_completion", body.model)
    prefix = body.prompt if body.echo and isinstance(body.prompt, str) else ""
    if body.stream:
        def chunk(event: GenerationEvent, first: bool) -> dict[str, Any]:
            text = (prefix if first else "") + event.text
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(event.finish_reason)}

        return StreamingResponse(_stream(service, prepared, body, envelope, chunk), media_type="text/event-stream")
    text, final = await _collect(service, prepared, request)
    return JSONResponse(envelope.wrap(
        [{"index": 0, "text": prefix + text, "logprobs": None, "finish_reason": _finish(final.finish_reason)}],
        _usage(final),
    ))
