"""Process settings: built once by the CLI or a test and handed to the app factory (nothing is read at import).

Every limit the server enforces lives here with its default, so operators find them in one place.
"""

from __future__ import annotations

from pathlib import Path

import platformdirs
from pydantic import BaseModel, Field


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

    # engine
    max_running: int = Field(64, ge=1, description="rows in the running batch")
    max_prefill_tokens: int = Field(8192, ge=16, description="prompt tokens per prefill forward")
    resident_interventions: int = Field(256, ge=1, description="interventions kept in the bank at once")

    # request limits
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    max_prompt_tokens: int = Field(8192, ge=1, description="longest prompt accepted, in tokens")
    max_stop_sequences: int = 4
    max_upload_bytes: int = Field(64 << 20, ge=1024, description="largest artifact or archive upload")
    max_archive_unpacked_bytes: int = Field(256 << 20, description="pyreft archive size once unpacked")
    max_archive_members: int = 256
    decoded_intervention_cache: int = Field(1024, ge=1, description="decoded artifacts kept in host memory")

    # training jobs
    max_queued_trainings: int = Field(8, ge=1, description="training jobs queued or running at once")
    max_training_examples: int = Field(1000, ge=1, description="examples per training job")
    max_example_tokens: int = Field(1024, ge=8, description="prompt + completion tokens per example")
    max_training_epochs: int = Field(1000, ge=1, description="epochs per training job")
    training_share: float = Field(
        0.5, gt=0, le=10, description="training time per engine iteration while serving, as a fraction of a decode step"
    )
    training_micro_batch_tokens: int = Field(
        256, ge=1, description="padded tokens per training micro-batch: smaller means shorter pauses in serving"
    )
    training_head_chunk_tokens: int = Field(
        8, ge=1, description="label tokens per LM-head slice of training (the head dominates for small models)"
    )
