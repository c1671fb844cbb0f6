"""Process settings: built once by the CLI or a test and handed to the app factory (nothing is read at import).

Every limit the server enforces lives here with its default, so operators find them in one place.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import BaseModel, Field, SecretStr

from adapters_store.backend import sqlite_path


# hard ceiling of `max_training_examples`: a request's list is refused at this length before any example in it is
# validated, so a million-example body costs a length check, not a million validations
TRAINING_EXAMPLES_CEILING = 10_000


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("reft-serve"))


class Settings(BaseModel):
    model: str | None = None  # None -> the embedded SmolLM2; else a local HF directory or .gguf file
    model_id: str | None = None  # name clients use for the bare model; defaults to the model's own id
    device: str | None = None  # None -> cuda if available else cpu
    dtype: str | None = None  # None -> bfloat16 on cuda, float32 on cpu
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Field(default_factory=default_data_dir)
    model_cache_dir: Path | None = None
    # shared state for several replicas (docs/deployment.md); the defaults keep everything under data_dir
    store: str | None = Field(
        None, description="where interventions, tenants, keys and jobs live: sqlite:///dir (a directory like "
        "data_dir) or postgresql://... (default: data_dir)",
    )
    limits_store: str | None = Field(
        None, description="redis://... to share the per-tenant rate limits between replicas (default: in memory)"
    )
    job_lease_s: float = Field(
        15.0, gt=0, description="with a PostgreSQL store: a training job whose replica has not renewed its lease for "
        "this long is claimed by another replica and run again (the replica died)",
    )
    job_max_attempts: int = Field(
        3, ge=1, description="with a PostgreSQL store: runs of one training job (each by a replica that then stopped) "
        "before it is failed with job_interrupted",
    )
    limits_store_prefix: str = Field("reft:limits:", description="prefix of the rate-limit keys in Redis")
    limits_fail_closed: bool = Field(
        False, description="with limits_store: refuse requests (503) while Redis is unreachable, instead of "
        "falling back to per-process buckets",
    )

    otlp_endpoint: str | None = Field(
        None, description="send OpenTelemetry traces to this OTLP/HTTP endpoint (e.g. http://collector:4318/v1/traces); "
        "needs the otel extra",
    )

    # tenants and API keys
    auth: Literal["auto", "on", "off"] = Field(
        "auto", description="require `Authorization: Bearer <key>`; auto: on unless bound to a loopback address"
    )
    admin_key: SecretStr | None = Field(None, description="the admin key (manages tenants, keys, public flags)")

    # per-tenant quotas (a tenant's own `limits`, set by an admin, override these)
    requests_per_minute: int = Field(600, ge=1, description="API requests per tenant per minute")
    tokens_per_minute: int = Field(
        2_000_000, ge=1, description="prompt + max_tokens per tenant per minute (unused max_tokens are refunded)"
    )
    max_interventions_per_tenant: int = Field(1000, ge=0, description="stored interventions per tenant")
    max_bytes_per_tenant: int = Field(
        1 << 30, ge=0, description="bytes of stored interventions per tenant, every retained version counted"
    )
    max_trainings_per_tenant: int = Field(2, ge=0, description="training jobs queued or running per tenant")

    # engine
    engine_process: bool = Field(
        True, description="run the engine in a process of its own (no GIL shared with HTTP); tests that pass a "
        "model object run it on a thread instead",
    )
    max_running: int = Field(64, ge=1, description="rows in the running batch")
    max_prefill_tokens: int = Field(8192, ge=16, description="prompt tokens per prefill forward")
    kv_cache_budget_bytes: int = Field(
        4 << 30, ge=1 << 20, description="bound on the running batch's KV cache (the slot buffers: rows x the longest "
        "row's prompt + max_tokens, each rounded up to a power of two); requests beyond it wait for rows to finish",
    )
    prefill_chunk_share: float = Field(
        0.5, ge=0, le=10, description="while rows decode, a long prompt is prefilled in chunks timed to add about this "
        "fraction of a decode step (running rows keep streaming); 0 prefills every prompt in one forward",
    )
    compile_decode: Literal["inductor", "cudagraphs"] | None = Field(
        None, description="run decode forwards through torch.compile with this backend (inductor: generated "
        "kernels; cudagraphs: CUDA graphs of the eager kernels, CUDA only); the first steps wait for the "
        "compilation, and outputs equal the eager ones",
    )
    speculative_tokens: int = Field(
        0, ge=0, le=16, description="speculative decoding: greedy requests draft up to this many tokens per step from "
        "their own prompt and output (n-gram lookup), verified in the decode forward; outputs stay the same, "
        "repetitive ones take fewer steps; 0 turns it off",
    )
    speculative_step_tokens: int = Field(
        16, ge=1, description="a speculative decode forward carries at most this many tokens (one per running row "
        "plus the drafts): past the width where a forward's cost stays flat, drafts slow every row down",
    )
    speculative_min_acceptance: float = Field(
        0.5, ge=0, le=1, description="a request drafts only while its lookups have lately guessed its next token at "
        "least this often (a failed draft costs the step its width for nothing; a GPU can afford a lower bar)",
    )
    resident_interventions: int = Field(256, ge=1, description="interventions kept in the bank at once")
    max_resident_bank_bytes: int = Field(
        1 << 30, ge=1 << 16, description="bound on the bank's tables (resident intervention weights); least recently "
        "used idle interventions are evicted to stay under it, requests wait when rows in use hold it all",
    )

    # request limits
    max_waiting_requests: int = Field(
        256, ge=0, description="requests waiting for a batch row; beyond this (plus max_running) new ones get 429"
    )
    request_timeout_s: float = Field(600.0, gt=0, description="a generation request is cancelled after this long")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long running requests may finish")
    max_request_bytes: int = Field(16 << 20, ge=1024, description="largest JSON request body")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    max_prompt_tokens: int = Field(8192, ge=1, description="longest prompt accepted, in tokens")
    max_stop_sequences: int = 4
    max_upload_bytes: int = Field(64 << 20, ge=1024, description="largest artifact or archive upload")
    max_file_bytes: int = Field(
        16 << 20, ge=1024, description="largest training file (POST /v1/files); its bytes count in the tenant's quota"
    )
    max_archive_unpacked_bytes: int = Field(256 << 20, description="pyreft archive size once unpacked")
    max_archive_members: int = 256
    max_versions_per_intervention: int = Field(
        10, ge=1, description="versions kept per intervention name (the oldest is dropped when a new one exceeds it)"
    )
    max_intervention_rank: int = Field(
        64, ge=1, description="largest rank of an uploaded, imported or trained intervention (and never above the "
        "model's hidden size)"
    )
    decoded_intervention_cache: int = Field(1024, ge=1, description="decoded artifacts kept in host memory")

    # connections (enforced by server/connections.py before a request reaches the app)
    max_connections: int = Field(
        512, ge=1, description="open HTTP connections; beyond this a new one is answered 503 and closed at once"
    )
    max_header_bytes: int = Field(
        64 << 10, ge=1024, description="request line + headers of one request; beyond this 431 and the connection closes"
    )
    header_timeout_s: float = Field(
        10.0, gt=0,
        description="a request's line and headers must arrive within this long of the connection opening (or, on a "
                    "kept-alive connection, of the request's first byte); else 408 and the connection closes",
    )
    body_timeout_s: float = Field(
        120.0, gt=0,
        description="a request's whole body must arrive within this long of its headers; else 408 and the connection "
                    "closes",
    )

    # training jobs
    max_queued_trainings: int = Field(8, ge=1, description="training jobs queued or running at once")
    max_training_examples: int = Field(
        1000, ge=1, le=TRAINING_EXAMPLES_CEILING, description="examples per training job"
    )
    max_example_tokens: int = Field(1024, ge=8, description="prompt + completion tokens per example")
    max_training_epochs: int = Field(1000, ge=1, description="epochs per training job")
    training_eval_max_tokens: int = Field(
        48, ge=1, le=512, description="tokens of each greedy answer in a finished job's evaluation (persona and base)"
    )
    training_events_keepalive_s: float = Field(
        15.0, gt=0, le=300, description="seconds of silence after which a training event stream sends a keep-alive "
        "comment (proxies close idle connections)"
    )
    training_share: float = Field(
        0.5, gt=0, le=10, description="training time per engine iteration while serving, as a fraction of a decode step"
    )
    training_micro_batch_tokens: int = Field(
        256, ge=1, description="padded tokens per training micro-batch: smaller means shorter pauses in serving"
    )
    training_head_chunk_tokens: int = Field(
        8, ge=1, description="label tokens per LM-head slice of training (the head dominates for small models)"
    )
    training_context_budget_bytes: int = Field(
        1 << 30, ge=0, description="frozen contexts a training job keeps (one job runs at a time); beyond it they are "
        "recomputed when needed: slower, same result"
    )
    training_max_micro_batch_tokens: int = Field(
        1024, ge=1, description="padded tokens per training micro-batch and labels per LM-head slice, even with nothing "
        "to serve: bounds a job's working memory"
    )
    max_training_working_bytes: int = Field(
        2 << 30, ge=0, description="estimated working memory of a job's largest micro-batch; a job above it gets 400"
    )

    @property
    def postgres_store(self) -> bool:
        return self.store is not None and self.store.startswith(("postgresql://", "postgres://"))

    def state_location(self, part: str) -> Path | str:
        """Where `part` ("store": interventions, "": tenants, "jobs") lives: the PostgreSQL database of a
        `postgresql://` store (one database holds all three), else under the directory of `sqlite:///dir` or
        data_dir."""
        if self.postgres_store:
            assert self.store is not None
            return self.store
        base = self.data_dir if self.store is None else sqlite_path(self.store)
        return base / part if part else base

    @property
    def auth_enabled(self) -> bool:
        if self.auth != "auto":
            return self.auth == "on"
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: only "localhost" is known to be loopback
            return self.host != "localhost"

    def limit(self, name: str, overrides: dict[str, object]) -> int:
        """A per-tenant quota: the tenant's override if it has one, else this server's default."""
        value = overrides.get(name, getattr(self, name))
        return int(value)  # type: ignore[call-overload]
