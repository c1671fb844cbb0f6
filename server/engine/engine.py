"""The engine: one thread that owns the model and runs the serving loop.

    loop: apply commands (submit / cancel) -> schedule (admit waiting rows) -> prefill new rows -> decode all
          running rows -> sample -> postprocess (detokenize, stop checks, emit, release finished rows)

Handlers call `submit`/`cancel` from any thread; those only enqueue commands. Everything that touches the model,
the bank, the cache or the scheduler happens on the engine thread.

Nothing a request can cause stops the loop: whatever fails for one row (loading its intervention, sampling,
detokenizing, delivering an event) fails that row only; a failing forward fails the rows of that forward; any
other exception in a step fails the running rows, resets the cache and the loop goes on. Only repeated failures of
whole steps (a broken device) end the thread; then `failure` says why, `/health` turns 503 so an orchestrator
restarts the process, and every request, waiting or new, fails at once instead of hanging.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import Tensor, nn

from reft_core.bank import InterventionBank
from reft_core.frozen_context import ModelDims
from reft_core.hooks import decoder_layers
from server.engine.chunk_sizing import ChunkSizer
from server.engine.residency import SlotTable
from server.engine.runner import ModelRunner, PrefillRow
from server.engine.sampler import greedy_continuations, sample
from server.engine.scheduler import KVBudget, Scheduler
from server.engine.sequence import EventSink, Sequence
from server.engine.settings import EngineSettings  # re-exported: the engine's settings, importable without torch
from server.engine.speculative import NgramProposer, accept_drafts
from server.engine.training_slices import TrainingSlices, TrainingTask, call_quietly  # TrainingTask: re-exported
from server.engine.types import ErrorKind, FinishReason, GenerationEvent, GenerationRequest
from server.metrics import Metrics

log = logging.getLogger("reft_serve.engine")
SHUTDOWN_ERROR = "the server is shutting down"
# Whole steps failing this many times in a row means the engine itself is broken (not one request): stop, so the
# process is restarted instead of failing every request forever.
MAX_CONSECUTIVE_STEP_FAILURES = 20
# At most this many prompts joining in one iteration ride in the decode forward; more are prefilled together.
MAX_PACKED_PROMPTS = 8


def eos_token_ids(model: nn.Module, tokenizer: Any) -> tuple[int, ...]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return tuple(sorted(ids))


class Engine:
    def __init__(
        self, model: nn.Module, tokenizer: Any, settings: EngineSettings = EngineSettings(), metrics: Metrics | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.eos_ids = eos_token_ids(model, tokenizer)
        device = next(model.parameters()).device
        bank = InterventionBank(
            hidden_size=int(model.config.hidden_size),
            num_layers=len(decoder_layers(model)),
            num_slots=settings.resident_interventions + 1,
            device=device,
        )
        self.slots = SlotTable(bank, settings.max_resident_bank_bytes)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or (0,))[0]
        self.runner = ModelRunner(model, bank, pad, settings.compile_decode, settings.long_row_tokens)
        kv_budget = KVBudget(ModelDims.from_model(model).kv_bytes_per_token(len(decoder_layers(model))),
                             settings.kv_cache_budget_bytes)
        self.scheduler = Scheduler(
            self.slots, max_running=settings.max_running, max_prefill_tokens=settings.max_prefill_tokens,
            kv_budget=kv_budget, kv_allocated=lambda: self.runner.cache_allocated, is_long=self.runner.is_long,
        )
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._exited = threading.Event()  # the loop has ended (stopped or died)
        self._by_request: dict[str, Sequence] = {}
        self._next_seq_id = 0
        self._training = TrainingSlices(model, settings.training_share, settings.idle_training_slice_s)
        self._draining = False
        self._closed = False  # set when the thread exits; later submits fail at once (guarded by _submit_lock)
        self._submit_lock = threading.Lock()
        self._failure: str | None = None
        self._device = device
        # Called on the engine thread after every loop iteration (and once at exit): the engine process flushes the
        # iteration's events to the API process here, as one message.
        self.after_iteration: Callable[[], None] | None = None
        self._decode_step_s = 0.0  # moving average of a plain decode step's duration: sizes training slices, chunks
        self._chunk_sizer = ChunkSizer(settings.prefill_chunk_share, settings.prefill_chunk_tokens)
        self._chunking: deque[Sequence] = deque()  # admitted rows whose prompts are prefilled a chunk at a time

    # -- API for other threads -------------------------------------------------------------------------------------
    def start(self) -> None:
        assert self._thread is None, "engine already started"
        self._thread = threading.Thread(target=self._run, name="reft-engine", daemon=True)
        self._thread.start()

    def run_here(self) -> None:
        """Run the loop on the calling thread until `stop` (from another thread) or until it dies. The engine
        process gives the loop its main thread and receives commands on another one."""
        assert self._thread is None, "engine already started"
        self._thread = threading.current_thread()
        self._run()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to stop and wait up to `timeout` for it to end."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._exited.wait(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._exited.is_set() and not self._stop.is_set()

    @property
    def failure(self) -> str | None:
        """Why the engine thread died (None while it runs, and after a requested stop)."""
        return self._failure

    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        """Queue a request; `sink` receives its events on the engine thread (it must be quick and thread-safe).

        If the engine has stopped, the request fails at once (on the caller's thread)."""
        with self._submit_lock:
            if not self._closed:
                self._commands.put(("submit", (request, sink)))
                self._wake.set()
                return
        kind, error = self._closed_reason()
        sink(GenerationEvent(text="", token_ids=(), finish_reason=FinishReason.ERROR, error=error, error_kind=kind,
                             prompt_tokens=len(request.prompt_ids)))

    def cancel(self, request_id: str) -> None:
        self._commands.put(("cancel", request_id))
        self._wake.set()

    def submit_training(self, task: TrainingTask) -> None:
        self._commands.put(("train", task))
        self._wake.set()

    def drain(self) -> None:
        """Stop admitting: requests still waiting for a row (and any submitted later) fail with SHUTDOWN_ERROR;
        running rows finish normally."""
        self._commands.put(("drain", None))
        self._wake.set()

    def cancel_training(self, job_id: str) -> None:
        self._commands.put(("cancel_training", job_id))
        self._wake.set()

    @property
    def idle(self) -> bool:
        return self.scheduler.idle and self._training.idle

    # -- engine thread ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        log.info("engine started", extra={"max_running": self.settings.max_running})
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - whatever ends the loop is reported, never silent
            self._failure = f"{type(exc).__name__}: {exc}"
            log.critical("engine thread died", exc_info=True, extra={"reason": self._failure})
        finally:
            self._close()
            self._after_iteration()
            self._exited.set()

    def _after_iteration(self) -> None:
        if self.after_iteration is not None:
            self.after_iteration()

    def _serve(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._apply_commands()
                if self.idle:
                    self._after_iteration()
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self.step()
                self._after_iteration()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - a failed step fails its rows, not the engine
                failures += 1
                if failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                    raise
                self._recover(exc)

    def _recover(self, exc: Exception) -> None:
        """A step failed outside any one row's handling: the running rows' cache may be inconsistent, so fail them
        (waiting rows stay queued) and start from an empty batch."""
        log.exception("engine step failed; failing the running rows", extra={"rows": len(self.scheduler.running)})
        for seq in list(self.scheduler.running.values()):
            self._finish(seq, FinishReason.ERROR, error=f"internal error during generation: {type(exc).__name__}")
        self.runner.reset()

    def _closed_reason(self) -> tuple[ErrorKind, str]:
        return closed_reason(self._failure)

    def _close(self) -> None:
        """The thread is exiting: refuse new work, fail everything still queued or running, end training jobs."""
        with self._submit_lock:
            self._closed = True
        kind, error = self._closed_reason()
        for command, payload in self._pending_commands():  # submits that raced the close
            if command == "submit":
                request, sink = payload
                _deliver(sink, GenerationEvent(text="", token_ids=(), finish_reason=FinishReason.ERROR, error=error,
                                               error_kind=kind, prompt_tokens=len(request.prompt_ids)))
            elif command == "train":
                self._training.add(payload)
        for seq in list(self._by_request.values()):
            self._finish(seq, FinishReason.ERROR, error=error, kind=kind)
        self._training.close()
        self._update_gauges()

    def step(self) -> None:
        """One iteration: admit and prefill new rows (a long prompt while rows decode: one chunk of it per
        iteration), then one decode step for every row in the batch, then a training slice. While rows decode, the
        new rows' prompts and the chunk ride in the decode forward where the model allows it."""
        loads = self.slots.loads
        admitted, refused = self.scheduler.admit()
        if self.slots.loads > loads:
            self.metrics.intervention_loads.inc(self.slots.loads - loads)
        now = time.perf_counter()
        for seq in admitted:
            seq.admitted_at = now
        for seq, exc in refused:
            log.warning("could not load the intervention", extra={**_ids(seq), "error": repr(exc)})
            self._finish(seq, FinishReason.ERROR, error=f"the intervention could not be loaded: {type(exc).__name__}")
        self._update_gauges()
        whole, chunked = self._chunk_sizer.split(admitted) if self.runner.row_ids else (admitted, [])
        long = [s for s in whole if self.runner.is_long(s.prompt_len)]  # prefilled where they will decode
        whole, chunked = [s for s in whole if s not in long], chunked + long
        for seq in chunked:
            self.runner.begin_chunked_prefill(PrefillRow.for_slots(seq.seq_id, seq.request.prompt_ids, seq.slots))
            self._chunking.append(seq)
        # Prompt pieces ride in the decode forward once a plain decode step has been timed (a chunk is sized by
        # what it adds to one); a burst of joining prompts is prefilled in a forward of its own (one attention
        # call per piece and layer would outweigh the weight read saved).
        packing = self.runner.packs_chunks and bool(self.runner.row_ids) and self._decode_step_s > 0
        if packing and len(whole) <= MAX_PACKED_PROMPTS and (whole or self._chunking):
            self._decode_packed(whole)
        else:
            if whole:
                self._prefill(whole)
            self._prefill_next_chunk()
            if self.runner.row_ids:
                self._decode()
        self._training.run_slice(bool(self.scheduler.running or self.scheduler.waiting), self._decode_step_s)
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(len(self.scheduler.waiting))
        self.metrics.running_rows.set(len(self.scheduler.running))
        self.metrics.resident_interventions.set(self.slots.resident)
        self.metrics.bank_bytes.set(self.slots.nbytes)
        # a count of distinct interventions, not a series per name: bounded, and no tenant's names in /metrics
        for state, seqs in (("running", self.scheduler.running.values()), ("waiting", self.scheduler.waiting)):
            active = {part.key for s in seqs for part in s.request.parts}
            self.metrics.active_interventions.labels(state=state).set(len(active))

    def _pending_commands(self) -> Iterator[tuple[str, Any]]:
        """The commands queued by other threads, oldest first, until the queue is empty."""
        while True:
            try:
                yield self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply_commands(self) -> None:
        for kind, payload in self._pending_commands():
            if kind == "submit":
                request, sink = payload
                seq = Sequence.create(self._next_seq_id, request, sink, self.tokenizer, self._device)
                self._next_seq_id += 1
                self._by_request[request.request_id] = seq
                self.scheduler.add(seq)
                if self._draining:
                    self._finish(seq, FinishReason.ERROR, error=SHUTDOWN_ERROR, kind=ErrorKind.SHUTDOWN)
            elif kind == "drain":
                self._draining = True
                for seq in list(self.scheduler.waiting):
                    self._finish(seq, FinishReason.ERROR, error=SHUTDOWN_ERROR, kind=ErrorKind.SHUTDOWN)
            elif kind == "cancel" and payload in self._by_request:
                self._finish(self._by_request[payload], FinishReason.CANCELLED)
            elif kind == "train":
                self._training.add(payload)
            elif kind == "cancel_training":
                self._training.cancel(payload)

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prefill admitted rows in one forward (they join the batch) and emit their first tokens."""
        started = time.perf_counter()
        try:
            rows = [PrefillRow.for_slots(s.seq_id, s.request.prompt_ids, s.slots) for s in seqs]
            logits = self.runner.prefill(rows)
        except Exception as exc:  # noqa: BLE001 - a failed forward fails its rows, not the engine
            self._fail_forward(exc, seqs, "prefill")
            return
        self.metrics.prefill_step.observe(time.perf_counter() - started)
        self.metrics.prompt_tokens.inc(sum(s.prompt_len for s in seqs))
        self._emit(logits, seqs)

    def _prefill_next_chunk(self) -> None:
        """Advance the oldest chunked prompt by one chunk; once complete, its row joins the batch."""
        if not self._chunking:
            return
        seq = self._chunking[0]
        remaining = self.runner.chunked_remaining(seq.seq_id)
        budget = self._chunk_sizer.next_chunk(remaining, bool(self.runner.row_ids))
        started = time.perf_counter()
        try:
            logits = self.runner.prefill_chunk(seq.seq_id, budget)
        except Exception as exc:  # noqa: BLE001
            self._fail_forward(exc, [seq], "prefill chunk")
            return
        elapsed = time.perf_counter() - started
        self.metrics.prefill_step.observe(elapsed)
        if budget < remaining:  # a full chunk (the last one is shorter and says little about the next)
            self._chunk_sizer.record(budget, elapsed)
            self._chunk_sizer.resize(budget, self._decode_step_s)
        if logits is None:
            return
        self._chunking.popleft()
        self.metrics.prompt_tokens.inc(seq.prompt_len)
        self._emit(logits, [seq])

    def _decode_packed(self, joining: list[Sequence]) -> None:
        """One forward for every decoding row, the whole prompts of rows joining now and the next chunk of the
        oldest chunked prompt, packed together (see `server.engine.packed`)."""
        seqs = [self.scheduler.running[i] for i in self.runner.row_ids]
        chunk, remaining = 0, 0
        if self._chunking:
            remaining = self.runner.chunked_remaining(self._chunking[0].seq_id)
            chunk = self._chunk_sizer.next_chunk(remaining, rows_decoding=True)
        chunks = [(self._chunking[0].seq_id, chunk)] if chunk else []
        started = time.perf_counter()
        try:
            logits, chunk_logits, join_logits = self.runner.decode_with_chunks(
                [s.last_token for s in seqs], chunks,
                [PrefillRow.for_slots(s.seq_id, s.request.prompt_ids, s.slots) for s in joining])
        except Exception as exc:  # noqa: BLE001 - as in `_decode`, the shared cache may be half-updated
            self._fail_forward(exc, list(self.scheduler.running.values()), "decode with prompt pieces")
            return
        elapsed = time.perf_counter() - started
        self.metrics.decode_step.observe(elapsed)
        # what the pieces cost is what they added to a plain decode step
        self._chunk_sizer.record(chunk + sum(s.prompt_len for s in joining), max(elapsed - self._decode_step_s, 0.0))
        if chunk and chunk < remaining:
            self._chunk_sizer.resize(chunk, self._decode_step_s)
        self._emit(logits, seqs)
        if chunk_logits and chunk_logits[0] is not None:
            self.metrics.prompt_tokens.inc(self._chunking[0].prompt_len)
            self._emit(chunk_logits[0], [self._chunking.popleft()])
        if join_logits is not None:
            self.metrics.prompt_tokens.inc(sum(s.prompt_len for s in joining))
            self._emit(join_logits, joining)

    def _decode(self) -> None:
        """One bare forward for every row in the batch, and their next tokens."""
        seqs = [self.scheduler.running[i] for i in self.runner.row_ids]
        drafts = self._drafts(seqs)
        if any(drafts):
            self._decode_speculative(seqs, drafts)
            return
        started = time.perf_counter()
        try:
            logits = self.runner.decode([s.last_token for s in seqs])
        except Exception as exc:  # noqa: BLE001
            # a decode failure can leave the shared cache half-updated: fail every running row, not just these
            self._fail_forward(exc, list(self.scheduler.running.values()), "decode")
            return
        elapsed = time.perf_counter() - started
        self.metrics.decode_step.observe(elapsed)
        self._decode_step_s = elapsed if not self._decode_step_s else 0.8 * self._decode_step_s + 0.2 * elapsed
        self._emit(logits, seqs)

    def _drafts(self, seqs: list[Sequence]) -> list[list[int]]:
        """Each row's draft for this step ([]: none), within the step's token cap (see `EngineSettings`)."""
        drafts: list[list[int]] = [[] for _ in seqs]
        longest = min(self.settings.speculative_tokens, self.settings.speculative_step_tokens // len(seqs) - 1)
        if longest <= 0 or not self.runner.drafts_allowed:
            return drafts
        for i, seq in enumerate(seqs):
            if not seq.sampling.greedy:
                continue
            if seq.proposer is None:
                seq.proposer = NgramProposer(seq.request.prompt_ids)
            seq.proposer.sync(seq.generated)
            # never draft past the request's end: the last accepted token would be thrown away
            room = min(longest, seq.request.params.max_tokens - len(seq.generated) - 1,
                       self.max_context - seq.prompt_len - len(seq.generated) - 1)
            if seq.proposer.acceptance >= self.settings.speculative_min_acceptance:
                drafts[i] = seq.proposer.propose(room)
        return drafts

    def _decode_speculative(self, seqs: list[Sequence], drafts: list[list[int]]) -> None:
        """One forward over every row's last token and its draft; each row emits the tokens greedy decoding would
        have produced one step at a time, as far as its draft stood (at least one)."""
        started = time.perf_counter()
        try:
            logits = self.runner.decode_drafts([s.last_token for s in seqs], drafts)
            first = self._sample(logits[:, 0], seqs)
            drafted = [i for i, d in enumerate(drafts) if d]
            continuations = greedy_continuations(logits[drafted, 1:], [seqs[i].sampling for i in drafted], self.eos_ids)
            emitted = [[token] for token in first]
            for i, targets in zip(drafted, continuations):
                emitted[i] = accept_drafts(drafts[i], [first[i], *targets[: len(drafts[i])]])
            self.runner.accept([len(tokens) for tokens in emitted])
        except Exception as exc:  # noqa: BLE001 - as in `_decode`, the shared cache may be half-updated
            self._fail_forward(exc, list(self.scheduler.running.values()), "speculative decode")
            return
        # observed, but kept out of `_decode_step_s`: that one times a plain step, what packed pieces add to
        self.metrics.decode_step.observe(time.perf_counter() - started)
        self.metrics.draft_tokens.inc(sum(len(d) for d in drafts))
        self.metrics.accepted_draft_tokens.inc(sum(len(tokens) - 1 for tokens in emitted))
        self._emit_tokens(seqs, emitted)

    def _fail_forward(self, exc: Exception, victims: list[Sequence], what: str) -> None:
        log.exception("forward failed", extra={"forward": what, "rows": len(victims)})
        for seq in victims:
            self._finish(seq, FinishReason.ERROR, error=f"internal error during generation: {type(exc).__name__}")

    def _emit(self, logits: Tensor, seqs: list[Sequence]) -> None:
        self._emit_tokens(seqs, [[token] for token in self._sample(logits, seqs)])

    def _emit_tokens(self, seqs: list[Sequence], tokens: list[list[int | None]]) -> None:
        """Hand each row its new tokens, in order, until the row finishes (a stop, its length, an error)."""
        for seq, row_tokens in zip(seqs, tokens):
            for token in row_tokens:
                if self._by_request.get(seq.request.request_id) is not seq:
                    break  # finished by an earlier token of this step
                try:
                    self._postprocess(seq, token)
                except Exception as exc:  # noqa: BLE001 - e.g. a detokenizer failure fails this row only
                    log.exception("postprocessing failed", extra=_ids(seq))
                    self._finish(seq, FinishReason.ERROR,
                                 error=f"internal error during generation: {type(exc).__name__}")

    def _sample(self, logits: Tensor, seqs: list[Sequence]) -> list[int | None]:
        """Sample the batch at once; should that fail, row by row, so only the rows that cannot be sampled fail."""
        try:
            return sample(logits, [s.sampling for s in seqs], self.eos_ids)
        except Exception:  # noqa: BLE001
            log.exception("batched sampling failed; sampling row by row", extra={"rows": len(seqs)})
        tokens: list[int | None] = []
        for i, seq in enumerate(seqs):
            try:
                tokens.extend(sample(logits[i : i + 1], [seq.sampling], self.eos_ids))
            except Exception:  # noqa: BLE001
                tokens.append(None)
        return tokens

    def _postprocess(self, seq: Sequence, token: int | None) -> None:
        if token is None:
            self._finish(seq, FinishReason.ERROR, error="the model produced non-finite logits for this request")
            return
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.ttft.observe(now - seq.arrived_at)
        elif seq.last_token_at is not None:
            self.metrics.inter_token.observe(now - seq.last_token_at)
        seq.last_token_at = now
        seq.generated.append(token)
        seq.sampling.generated += 1
        self.metrics.tokens_generated.inc()
        params = seq.request.params
        if token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos):
            self._finish(seq, FinishReason.STOP, token=token)
            return
        text, hit_stop = seq.detokenizer.add(token)
        if hit_stop:
            self._finish(seq, FinishReason.STOP, text=text, token=token)
        elif len(seq.generated) >= params.max_tokens or seq.prompt_len + len(seq.generated) >= self.max_context:
            self._finish(seq, FinishReason.LENGTH, text=text + seq.detokenizer.flush(), token=token)
        else:
            _deliver(seq.sink, GenerationEvent(text=text, token_ids=(token,)))

    def _finish(
        self, seq: Sequence, reason: FinishReason, *, text: str = "", token: int | None = None, error: str | None = None,
        kind: ErrorKind | None = None,
    ) -> None:
        if seq.request.request_id not in self._by_request:
            return
        del self._by_request[seq.request.request_id]
        if seq in self._chunking:
            self._chunking.remove(seq)
        if not self.scheduler.remove_waiting(seq):
            self.runner.release([seq.seq_id])
            self.scheduler.finish(seq)
        self.metrics.running_rows.set(len(self.scheduler.running))
        if reason is FinishReason.CANCELLED and seq.generated:
            text = call_quietly(seq.detokenizer.flush) or ""
        if reason is FinishReason.ERROR and kind is None:
            kind = ErrorKind.INTERNAL
        self.metrics.requests.labels(finish_reason=reason.value).inc()
        _deliver(
            seq.sink,
            GenerationEvent(
                text=text,
                token_ids=(token,) if token is not None else (),
                finish_reason=reason,
                prompt_tokens=seq.prompt_len,
                completion_tokens=len(seq.generated),
                error=error,
                error_kind=kind,
                timings=self._timings(seq),
            ),
        )

    @staticmethod
    def _timings(seq: Sequence) -> dict[str, float]:
        """Where the request's time went, sent back with its final event: the API process turns these into
        per-request metrics and trace spans (no tracing across the process boundary)."""
        end = time.perf_counter()
        admitted = seq.admitted_at if seq.admitted_at is not None else end
        timings = {"queue_s": admitted - seq.arrived_at, "engine_s": end - seq.arrived_at}
        if seq.admitted_at is not None:
            timings["prefill_s"] = (seq.first_token_at or end) - seq.admitted_at
        if seq.first_token_at is not None:
            timings["ttft_s"] = seq.first_token_at - seq.arrived_at
            timings["decode_s"] = (seq.last_token_at or seq.first_token_at) - seq.first_token_at
        if seq.last_token_at is not None:
            timings["total_s"] = seq.last_token_at - seq.arrived_at
        return timings

    def run_until_idle(self, requests: Iterable[tuple[GenerationRequest, EventSink]]) -> None:
        """Synchronous driver for tests and benchmarks: submit everything and step on this thread until done."""
        assert self._thread is None, "run_until_idle drives the engine itself; do not start() it"
        for request, sink in requests:
            self.submit(request, sink)
        self._apply_commands()
        while not self.idle:
            self.step()
            self._apply_commands()


def closed_reason(failure: str | None) -> tuple[ErrorKind, str]:
    """Why requests fail once an engine has stopped: it died (`failure`), or it was stopped on purpose."""
    if failure is not None:
        return ErrorKind.ENGINE_DEAD, f"the generation engine stopped ({failure}); the server must restart"
    return ErrorKind.SHUTDOWN, SHUTDOWN_ERROR


def _ids(seq: Sequence) -> dict[str, str]:
    """Log fields naming a request: the engine's id and the caller's X-Request-Id (the engine thread and process
    have no request context of their own)."""
    return {"request": seq.request.request_id, "request_id": seq.request.client_request_id or ""}


def _deliver(sink: EventSink, event: GenerationEvent) -> None:
    """Hand an event to a request's sink; a broken sink (its event loop gone) must not reach the engine loop."""
    try:
        sink(event)
    except Exception:  # noqa: BLE001
        log.warning("could not deliver a generation event", exc_info=True)
