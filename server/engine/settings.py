"""The engine's settings: a plain dataclass with no torch import, so the CLI can build an engine process's spec
(`server.engine.launch`) before the heavy imports."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineSettings:
    max_running: int = 64  # rows in the running batch
    max_prefill_tokens: int = 8192  # prompt tokens per prefill forward
    resident_interventions: int = 256  # bank slots (besides the identity)
    max_resident_bank_bytes: int | None = None  # bound on the bank's tables (see SlotTable); None: slots only
    # While requests are being served, training gets this fraction of a decode step's time per engine iteration
    # (so inter-token latency grows by about that fraction); with nothing to serve it runs in idle_training_slice_s
    # chunks, which bounds how long a newly arrived request waits for its prefill.
    training_share: float = 0.5
    idle_training_slice_s: float = 0.1
    # While rows are decoding, a long prompt is prefilled a chunk per iteration, each chunk timed to add about this
    # fraction of a decode step (running rows' inter-token latency grows by that much); 0 turns it off. With chunks
    # packed into decode forwards, 0.5 measured p99/p50 inter-token latency 1.54-1.79 against 2.12-2.50 for 0.8
    # (16 streams over HTTP, a 2,000-token prompt arriving, 2-core CPU): steps that stay well under twice the
    # usual leave room for the machine's noise, at the price of the long prompt joining later.
    prefill_chunk_share: float = 0.5
    prefill_chunk_tokens: int | None = None  # a fixed chunk size instead of the measured one (tests, tuning)
    kv_cache_budget_bytes: int | None = None  # bound on the batch's KV cache (see Scheduler); None: unbounded
    compile_decode: str | None = None  # a torch.compile backend for decode forwards (see ModelRunner); None: eager
    # Speculative decoding (see `server.engine.speculative`): greedy rows draft up to this many tokens per step from
    # their own prompt and output; 0 turns it off. The forward is [rows, 1 + the longest draft], and its cost is
    # flat in tokens only up to a point (2-core CPU, SmolLM2: 16 tokens 81 ms, 32: 112 ms, 80: 190 ms; a GPU's
    # flat region is far wider), so a step drafts only while rows x (1 + draft) stays within
    # `speculative_step_tokens`: a full batch drafts nothing. Only rows whose guesses have been right at least
    # `speculative_min_acceptance` of the time lately draft: a draft that fails costs the step its width for nothing
    # (on that CPU a forward 2-5 tokens wide costs ~1.5x one token wide for one row).
    speculative_tokens: int = 0
    speculative_step_tokens: int = 16
    speculative_min_acceptance: float = 0.5
    # Rows whose prompts are at least this long decode in a cache of their own (see `ModelRunner`): in the slot
    # cache they would widen every row's slot to their length (packable architectures only).
    long_row_tokens: int = 512
