"""Bridges HTTP handlers and the engine: resolve the model name, tokenize, validate lengths, submit, stream events.

Handlers never call torch: tokenization and intervention lookup run in a threadpool, and the engine delivers
events onto the handler's event loop through a thread-safe sink. Leaving the event stream early (client gone,
generator closed) cancels the request so its batch row is freed at once.

Admission control happens here, cheapest check first: the bounded engine queue (429 at once, before
tokenizing), then the tenant's tokens-per-minute quota (prompt + max_tokens reserved; the unused part is refunded
when the request ends). A request that runs longer than `request_timeout_s` is cancelled and fails with 504.
"""

from __future__ import annotations

import asyncio
import difflib
import threading
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from starlette.concurrency import run_in_threadpool

from server.composition import CompositionError, PartNotFoundError
from server.engine.remote import EngineHandle
from server.engine.types import (
    ComposedRef, ErrorKind, FinishReason, GenerationEvent, GenerationRequest, InterventionRef, SamplingParams,
    TrainingEnd,
)
from server.errors import APIError, rate_limited
from server.metrics import Metrics
from server.quotas import Limiter, RateLimiter
from server.registry import InterventionRegistry
from server.request_context import current_request_id
from server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.settings import Settings
from server.tracing import Tracing
from adapters_store import InterventionNotFoundError, InvalidNameError

# A 404's "did you mean" compares the unknown name with at most this many names (of each kind: own, public); beyond
# it, with those that start with the same character (difflib over 100k names would cost a 404 half a second).
HINT_NAMES = 2000


class LoopDispatcher:
    """Hands engine events to one asyncio loop with a single wakeup per burst.

    The engine emits one event per running row per step; waking the loop once per event (64 wakeups a step at
    batch 64) costs CPU the engine needs. Events are queued here and one scheduled flush delivers them all.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: deque[tuple[asyncio.Queue[GenerationEvent], GenerationEvent]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, queue: asyncio.Queue[GenerationEvent], event: GenerationEvent) -> None:
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            items, self._scheduled = list(self._pending), False
            self._pending.clear()
        for queue, event in items:
            queue.put_nowait(event)


@dataclass(frozen=True)
class PreparedRequest:
    request: GenerationRequest
    model: str
    tenant: str = "default"
    reserved_tokens: int = 0  # charged to the tenant's tokens-per-minute bucket at admission
    tokens_per_minute: int = 0


@dataclass(frozen=True)
class Caller:
    """Who a generation is for: the tenant, its token quota, and whether quotas apply (not for the admin)."""

    tenant: str = "default"
    tokens_per_minute: int | None = None  # None: not limited


class GenerationService:
    def __init__(
        self, engine: EngineHandle, tokenizer: Any, registry: InterventionRegistry, settings: Settings, model_id: str,
        rate_limiter: Limiter | None = None, capacity: int | None = None, *, metrics: Metrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.tracing = tracing or Tracing()
        self.tokenizer = tokenizer
        self.registry = registry
        self.settings = settings
        self.model_id = model_id
        self.rate_limiter: Limiter = rate_limiter or RateLimiter()
        # requests running or queued in the engine at once (N engine replicas hold N times one engine's bound)
        self.capacity = capacity or settings.max_running + settings.max_waiting_requests
        self._dispatchers: dict[asyncio.AbstractEventLoop, LoopDispatcher] = {}
        self._in_flight = 0  # submitted and not finished
        self._preparing = 0  # admitted and still tokenizing / validating
        self._in_flight_lock = threading.Lock()
        self.draining = False

    @contextmanager
    def admission(self) -> Iterator[None]:
        """Refuse at once when the engine's queue is full or the server is draining (before any tokenizing).

        Requests being prepared count against the queue too, so a burst cannot slip past the limit while it
        tokenizes; from `events()` on, the request counts as in flight instead.
        """
        if self.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if self.engine.failure is not None:
            raise APIError(503, f"the generation engine stopped ({self.engine.failure}); the server must restart",
                           type="server_error", code="engine_unavailable")
        limit = self.capacity
        with self._in_flight_lock:
            busy = self._in_flight + self._preparing >= limit
            if not busy:
                self._preparing += 1
        if busy:
            raise rate_limited(f"the server is at capacity ({limit} requests running or queued); retry shortly", 1.0,
                               "server_busy")
        try:
            yield
        finally:
            with self._in_flight_lock:
                self._preparing -= 1

    async def prepare_chat(self, body: ChatCompletionRequest, caller: Caller = Caller()) -> PreparedRequest:
        _refuse_unsupported(body)
        with self.admission():
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
            prompt_ids = await run_in_threadpool(self._chat_ids, messages)
            return await self._prepare(body, prompt_ids, body.requested_max_tokens, caller)

    async def prepare_completion(self, body: CompletionRequest, caller: Caller = Caller()) -> PreparedRequest:
        _refuse_unsupported(body)
        with self.admission():
            return await self._prepare_completion(body, caller)

    async def _prepare_completion(self, body: CompletionRequest, caller: Caller) -> PreparedRequest:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
            prompt_ids = list(prompt)
        else:
            text = prompt[0] if isinstance(prompt, list) else prompt
            prompt_ids = await run_in_threadpool(self._text_ids, text)
        return await self._prepare(body, prompt_ids, body.requested_max_tokens, caller)

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self._text_ids(text)

    def _text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def _prepare(
        self, body: SamplingFields, prompt_ids: list[int], max_tokens: int | None, caller: Caller
    ) -> PreparedRequest:
        ref = await self.resolve(body.model, caller.tenant)
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="empty_prompt")
        if len(prompt_ids) > self.settings.max_prompt_tokens:
            raise APIError(
                400, f"the prompt has {len(prompt_ids)} tokens; the limit is {self.settings.max_prompt_tokens}",
                param="messages", code="context_length_exceeded",
            )
        room = self.engine.max_context - len(prompt_ids)
        if max_tokens is not None and max_tokens > self.settings.max_tokens_limit:
            raise APIError(
                400, f"max_tokens {max_tokens} exceeds the server limit {self.settings.max_tokens_limit}",
                param="max_tokens", code="invalid_value",
            )
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise APIError(
                400,
                f"This model's maximum context length is {self.engine.max_context} tokens; the prompt has "
                f"{len(prompt_ids)} and {max_tokens or 1} more were requested.",
                param="max_tokens", code="context_length_exceeded",
            )
        effective_max = max_tokens if max_tokens is not None else min(self.settings.default_max_tokens, room)
        stops = body.stop_list()
        if len(stops) > self.settings.max_stop_sequences:
            raise APIError(400, f"at most {self.settings.max_stop_sequences} stop sequences", param="stop")
        if body.min_tokens > effective_max:
            raise APIError(400, "min_tokens must not exceed max_tokens", param="min_tokens", code="invalid_value")
        params = SamplingParams(
            max_tokens=effective_max,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0),
            min_tokens=body.min_tokens,
            stop=tuple(stops),
            ignore_eos=body.ignore_eos,
            seed=body.seed,
        )
        request = GenerationRequest(uuid.uuid4().hex, tuple(prompt_ids), params, ref, current_request_id())
        reserved = 0
        if caller.tokens_per_minute is not None:
            reserved = len(prompt_ids) + effective_max
            wait = self.rate_limiter.take(caller.tenant, "tokens", reserved, caller.tokens_per_minute)
            if wait:
                raise rate_limited(f"rate limit of {caller.tokens_per_minute} tokens per minute reached (this request "
                                   f"needs {reserved}: prompt + max_tokens)", wait, "tokens_per_minute")
        return PreparedRequest(request, body.model, caller.tenant, reserved, caller.tokens_per_minute or 0)

    async def resolve(self, model: str, tenant: str = "default") -> InterventionRef | ComposedRef | None:
        """The registry resolves `model` (the base model's id: no intervention; `name`, `owner/name`, `@N` pins a
        version; `a+b` composes). Anything it cannot resolve is one 404 that does not say whether the name or
        version exists (for a composition, naming the part that failed)."""
        try:
            target = self.registry.lookup_cached(model, tenant)
            return (target or await run_in_threadpool(self.registry.lookup, model, tenant)).ref
        except (InterventionNotFoundError, InvalidNameError):
            raise await self._not_found(model, tenant) from None
        except PartNotFoundError as exc:
            raise await self._not_found(exc.part, tenant) from None
        except CompositionError as exc:
            raise APIError(400, str(exc), param="model", code="invalid_value") from None

    async def _not_found(self, model: str, tenant: str) -> APIError:
        close = await run_in_threadpool(self._close_names, model, tenant)
        hint = f"; did you mean {' or '.join(repr(n) for n in close)}?" if close else ""
        return _model_not_found(model, hint)

    def _close_names(self, model: str, tenant: str) -> list[str]:
        """Names close to `model` among those the caller may use (the base model, its own interventions, others'
        public ones as `owner/name`): never another tenant's private name."""
        try:
            store = self.registry.store
            names = store.visible_names(tenant, "", HINT_NAMES + 1)
            if len(names) > HINT_NAMES:  # a large registry: compare with the names that start like the request
                names = store.visible_names(tenant, model[:1], HINT_NAMES)
            names = [self.model_id, *names]
        except Exception:  # noqa: BLE001 - a hint is not worth failing the 404 over
            return []
        return difflib.get_close_matches(model, names, n=3, cutoff=0.6)

    async def events(self, prepared: PreparedRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Submit and yield events until the final one; cancels the request if the consumer stops early."""
        loop = asyncio.get_running_loop()
        dispatcher = self._dispatchers.get(loop) or self._dispatchers.setdefault(loop, LoopDispatcher(loop))
        queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        finished = False

        def sink(event: GenerationEvent) -> None:
            dispatcher.post(queue, event)

        with self._in_flight_lock:
            self._in_flight += 1
        self.engine.submit(prepared.request, sink)
        # One timer per request (not a timeout per awaited event): it drops a marker into the queue at the deadline.
        timer = loop.call_later(self.settings.request_timeout_s, queue.put_nowait, _TIMED_OUT)
        generated = 0
        try:
            while True:
                event = await queue.get()
                if event is _TIMED_OUT:
                    yield GenerationEvent(
                        text="", token_ids=(), finish_reason=FinishReason.ERROR,
                        prompt_tokens=len(prepared.request.prompt_ids), completion_tokens=generated,
                        error=TIMEOUT_ERROR.format(self.settings.request_timeout_s), error_kind=ErrorKind.TIMEOUT,
                    )
                    return
                event = _coalesce(event, queue)
                generated += len(event.token_ids)
                finished = event.finish_reason is not None
                if finished:
                    self._observe(event, prepared)
                yield event
                if finished:
                    return
        finally:
            timer.cancel()
            if not finished:
                self.engine.cancel(prepared.request.request_id)
            with self._in_flight_lock:
                self._in_flight -= 1
            if prepared.reserved_tokens:  # give back the max_tokens this request did not use
                used = len(prepared.request.prompt_ids) + generated
                self.rate_limiter.refund(prepared.tenant, "tokens", max(0, prepared.reserved_tokens - used),
                                         prepared.tokens_per_minute)


    def _observe(self, final: GenerationEvent, prepared: PreparedRequest) -> None:
        """Per-request metrics and the engine's trace spans, from the timings that came back with the final event."""
        timings, m = final.timings, self.metrics
        if "engine_s" in timings:
            m.request_latency.observe(timings["engine_s"])
            m.request_queue.observe(timings["queue_s"])
        if "prefill_s" in timings:
            m.request_prefill.observe(timings["prefill_s"])
        if "decode_s" in timings:
            m.request_decode.observe(timings["decode_s"])
        m.request_prompt_tokens.observe(final.prompt_tokens)
        m.request_generation_tokens.observe(final.completion_tokens)
        self.tracing.engine_spans(timings, **{"reft.prompt_tokens": final.prompt_tokens,
                                              "reft.completion_tokens": final.completion_tokens})


_TIMED_OUT = GenerationEvent(text="", token_ids=())  # identity marker: the request's deadline passed


def _refuse_unsupported(body: SamplingFields) -> None:
    field = body.unsupported()
    if field is not None:
        raise APIError(400, f"{field} is not supported by this server; remove it from the request", param=field,
                       code="unsupported_parameter")


def _coalesce(event: GenerationEvent, queue: asyncio.Queue[GenerationEvent]) -> GenerationEvent:
    """Merge events already waiting into one, so a slow consumer gets fewer, larger chunks (less per-token work)."""
    while event.finish_reason is None and not queue.empty():
        following = queue.get_nowait()
        if following is _TIMED_OUT:  # leave the marker for the caller's next get
            queue.put_nowait(following)
            break
        event = replace(
            following, text=event.text + following.text, token_ids=event.token_ids + following.token_ids
        )
    return event


TIMEOUT_ERROR = "the request timed out after {:g} s"


def _model_not_found(model: str, hint: str = "") -> APIError:
    return APIError(404, f"The model '{model}' does not exist{hint}", type="not_found_error", param="model",
                    code="model_not_found")

# One table from why a request failed to what the caller gets (streams carry the same body as an error event).
_ERROR_RESPONSES: dict[ErrorKind, tuple[int, str, str]] = {
    ErrorKind.INTERNAL: (500, "server_error", "generation_failed"),
    ErrorKind.SHUTDOWN: (503, "server_error", "shutting_down"),
    ErrorKind.ENGINE_DEAD: (503, "server_error", "engine_unavailable"),
    ErrorKind.TIMEOUT: (504, "timeout_error", "request_timeout"),
    ErrorKind.OVERLOADED: (429, "rate_limit_error", "server_busy"),
}


# A training job that failed carries a code from the same vocabulary: the same cause, the same code.
_JOB_ERROR_CODES: dict[TrainingEnd, str] = {
    TrainingEnd.FAILED: "training_failed",
    TrainingEnd.SHUTDOWN: _ERROR_RESPONSES[ErrorKind.SHUTDOWN][2],
}
JOB_SAVE_FAILED = "storage_unavailable"  # the store refused the trained version (as a write error answers: 507)


def job_error_code(kind: TrainingEnd) -> str:
    return _JOB_ERROR_CODES[kind]


def error_for(event: GenerationEvent) -> APIError:
    """The API error for a failed request's final event."""
    kind = event.error_kind or ErrorKind.INTERNAL
    status, type_, code = _ERROR_RESPONSES[kind]
    if kind is ErrorKind.OVERLOADED:
        return rate_limited(event.error or "the server is at capacity; retry shortly", 1.0, code)
    return APIError(status, event.error or "generation failed", type=type_, code=code)


def raise_for_error(event: GenerationEvent) -> None:
    if event.finish_reason is FinishReason.ERROR:
        raise error_for(event)
