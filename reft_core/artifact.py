"""The artifact format: one `.safetensors` file whose header metadata carries a JSON manifest.

This module is the only place that knows file layout, tensor names, the format version and validation. Artifacts
come from untrusted uploads, so `decode_artifact` parses everything in memory (no pickle, no code), bounds the
header, and checks the manifest, tensor names/shapes/dtypes, finiteness, the content digest and (when given) the
base-model fingerprint before returning. Each failure raises a typed `ArtifactError` that says what is wrong.

Layout:
    tensors   "layer.{L}.{group}.{R|W|b}" for every unit of the config (see reft_core.config.Unit)
    metadata  {"reft_serve.manifest": <JSON manifest>}
    manifest  {format, format_version, config, hidden_size, base_model, training, digest}

Forward compatibility: unknown manifest keys are ignored; a higher `format_version` is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from reft_core.atomic_io import write_atomically
from reft_core.config import InterventionConfig
from reft_core.errors import (
    ArtifactFormatError,
    ArtifactIntegrityError,
    IncompatibleBaseModelError,
    InvalidConfigError,
    UnsupportedFormatVersionError,
)
from reft_core.fingerprint import ModelFingerprint
from reft_core.intervention import Intervention

FORMAT_NAME = "reft-serve/intervention"
FORMAT_VERSION = 1
MANIFEST_KEY = "reft_serve.manifest"
MAX_HEADER_BYTES = 1 << 20  # an artifact's header lists a few dozen tensors; refuse absurd headers early
FILE_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Artifact:
    intervention: Intervention
    base_model: ModelFingerprint
    training: dict[str, Any] = field(default_factory=dict)
    digest: str = ""  # "sha256:<hex>" over manifest (sans digest) and tensor contents


def content_digest(manifest_without_digest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(json.dumps(manifest_without_digest, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return "sha256:" + digest.hexdigest()


def encode_artifact(
    intervention: Intervention, base_model: ModelFingerprint, training: dict[str, Any] | None = None
) -> tuple[bytes, Artifact]:
    """Serialise to the artifact bytes; returns them with the Artifact (carrying its digest)."""
    dtype = intervention.config.torch_dtype
    tensors = {name: t.to(dtype) for name, t in intervention.tensors().items()}
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": intervention.config.to_dict(),
        "hidden_size": intervention.hidden_size,
        "base_model": base_model.to_dict(),
        "training": dict(training or {}),
    }
    digest = content_digest(manifest, tensors)
    payload = safetensors.torch.save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest | {"digest": digest})})
    return payload, Artifact(intervention, base_model, dict(training or {}), digest)


def save_artifact(
    path: Path, intervention: Intervention, base_model: ModelFingerprint, training: dict[str, Any] | None = None
) -> Artifact:
    """Write an artifact file atomically (temp file in the same directory, fsync, rename)."""
    payload, artifact = encode_artifact(intervention, base_model, training)
    write_atomically(Path(path), payload)
    return artifact


def load_artifact(path: Path, *, base_model: ModelFingerprint | None = None) -> Artifact:
    return decode_artifact(Path(path).read_bytes(), base_model=base_model)


def _read_header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise ArtifactFormatError("not a safetensors file: shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or header_len > len(data) - 8:
        raise ArtifactFormatError(f"not a safetensors file: header length {header_len} is implausible")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactFormatError(f"not a safetensors file: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ArtifactFormatError("not a safetensors file: header is not a JSON object")
    return header


def _read_manifest(header: dict[str, Any]) -> dict[str, Any]:
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or MANIFEST_KEY not in metadata:
        raise ArtifactFormatError(f"safetensors file has no '{MANIFEST_KEY}' metadata: not a reft-serve artifact")
    try:
        manifest = json.loads(metadata[MANIFEST_KEY])
    except (TypeError, json.JSONDecodeError) as exc:
        raise ArtifactFormatError(f"artifact manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactFormatError(f"artifact manifest must have format {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactFormatError("artifact manifest has no integer format_version")
    if version > FORMAT_VERSION or version < 1:
        raise UnsupportedFormatVersionError(
            f"artifact format_version {version} is not supported (this build reads versions 1..{FORMAT_VERSION})"
        )
    for key, kind in (("config", dict), ("hidden_size", int), ("base_model", dict), ("digest", str)):
        if not isinstance(manifest.get(key), kind):
            raise ArtifactFormatError(f"artifact manifest field {key!r} is missing or not a {kind.__name__}")
    if not isinstance(manifest.get("training", {}), dict):
        raise ArtifactFormatError("artifact manifest field 'training' must be an object")
    return manifest


def decode_artifact(data: bytes, *, base_model: ModelFingerprint | None = None) -> Artifact:
    """Validate artifact bytes completely in memory and return the Artifact (raises ArtifactError subclasses)."""
    manifest = _read_manifest(_read_header(data))
    try:
        config = InterventionConfig.from_dict(manifest["config"])
        fingerprint = ModelFingerprint.from_dict(manifest["base_model"])
    except (InvalidConfigError, ValueError, TypeError) as exc:
        raise ArtifactFormatError(f"artifact manifest is invalid: {exc}") from None
    hidden_size = manifest["hidden_size"]
    if base_model is not None:
        _check_base_model(config, hidden_size, fingerprint, base_model)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error types for corrupt payloads
        raise ArtifactFormatError(f"corrupt safetensors payload: {exc}") from None
    wrong_dtype = sorted(name for name, t in tensors.items() if t.dtype != config.torch_dtype)
    if wrong_dtype:
        raise ArtifactFormatError(f"tensors {wrong_dtype} are not {config.dtype} as the manifest declares")
    intervention = Intervention.from_tensors(config, hidden_size, tensors)  # names, shapes, NaN/Inf
    expected_digest = content_digest({k: v for k, v in manifest.items() if k != "digest"}, tensors)
    if manifest["digest"] != expected_digest:
        raise ArtifactIntegrityError("artifact content does not match its digest (corrupted or edited)")
    return Artifact(intervention, fingerprint, manifest.get("training", {}), expected_digest)


def _check_base_model(
    config: InterventionConfig, hidden_size: int, trained_on: ModelFingerprint, serving: ModelFingerprint
) -> None:
    if hidden_size != serving.hidden_size:
        raise IncompatibleBaseModelError(
            f"artifact hidden size {hidden_size} does not match the base model's {serving.hidden_size}"
        )
    out_of_range = [layer for layer in config.layers if layer >= serving.num_layers]
    if out_of_range:
        raise IncompatibleBaseModelError(
            f"artifact layers {out_of_range} out of range: the base model has {serving.num_layers} layers"
        )
    reason = serving.mismatch(trained_on)
    if reason:
        raise IncompatibleBaseModelError(f"artifact was trained on another base model ({reason})")
