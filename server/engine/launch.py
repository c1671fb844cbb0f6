"""Starting the engine process, importable without torch.

`reft-serve serve` runs two Python processes, the API process and the engine process (`server.engine.remote`),
and each imports torch and transformers: seconds each on a small machine, before the engine process loads the
weights. Started one after the other, the engine process began only once the API process had imported everything
and built its app. `launch` needs nothing heavy, so the CLI calls it first and both processes import at once;
`RemoteEngine` then adopts the launched process and waits for its model (see BENCHMARKS.md, "Start").

The child resolves the model itself (converting a GGUF file on first use) and reports the directory it loaded in
its `ModelInfo`, where the API process loads the tokenizer from.
"""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING

from server.engine.settings import EngineSettings

if TYPE_CHECKING:
    from server.settings import Settings


@dataclass(frozen=True)
class EngineProcessSpec:
    """What the child needs to build the engine (picklable)."""

    model: Path | str | None  # a local HF directory or GGUF file; None: the embedded default
    device: str | None
    dtype: str | None
    engine: EngineSettings
    log_level: str = "info"
    log_format: str = "json"
    model_cache_dir: Path | None = None  # where GGUF conversions are cached (None: the default)


@dataclass(frozen=True)
class EngineLaunch:
    """An engine process started and not yet adopted: its process and our end of its pipe."""

    process: BaseProcess
    conn: Connection


def launch(spec: EngineProcessSpec) -> EngineLaunch:
    """Start the engine process; it loads the model meanwhile (`RemoteEngine.start` waits for it)."""
    context = multiprocessing.get_context("spawn")  # never fork a process that has started torch threads
    conn, child_conn = context.Pipe(duplex=True)
    process = context.Process(target=_engine_process, args=(spec, child_conn), name="reft-engine", daemon=True)
    process.start()
    child_conn.close()  # ours is the only end left in this process: EOF when the child exits
    return EngineLaunch(process, conn)


def engine_settings(settings: Settings) -> EngineSettings:
    return EngineSettings(
        max_running=settings.max_running,
        max_prefill_tokens=settings.max_prefill_tokens,
        resident_interventions=settings.resident_interventions,
        max_resident_bank_bytes=settings.max_resident_bank_bytes,
        training_share=settings.training_share,
        prefill_chunk_share=settings.prefill_chunk_share,
        kv_cache_budget_bytes=settings.kv_cache_budget_bytes,
        compile_decode=settings.compile_decode,
        speculative_tokens=settings.speculative_tokens,
        speculative_step_tokens=settings.speculative_step_tokens,
        speculative_min_acceptance=settings.speculative_min_acceptance,
    )


def spec_for(settings: Settings) -> EngineProcessSpec:
    """The engine process of a server with these settings, logging as this process does."""
    from server.logging_setup import current_format

    return EngineProcessSpec(settings.model, settings.device, settings.dtype, engine_settings(settings),
                             logging.getLevelName(logging.getLogger().level).lower(), current_format(),
                             settings.model_cache_dir)


def _engine_process(spec: EngineProcessSpec, conn: Connection) -> None:
    from server.engine.remote import engine_process_main  # torch and transformers: in the child only

    engine_process_main(spec, conn)
