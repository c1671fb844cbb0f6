"""Artifact format: save -> load is the identity; every malformed or mismatched artifact is refused with a typed error."""

from __future__ import annotations

import json
import struct
from dataclasses import replace

import pytest
import safetensors.torch
import torch

from reft_core.artifact import FORMAT_VERSION, MANIFEST_KEY, decode_artifact, encode_artifact, load_artifact, save_artifact
from reft_core.config import InterventionConfig
from reft_core.errors import (
    ArtifactFormatError,
    ArtifactIntegrityError,
    IncompatibleBaseModelError,
    UnsupportedFormatVersionError,
)
from reft_core.fingerprint import fingerprint_model
from reft_core.generate import generate

from .conftest import random_intervention, tiny_llama

CONFIG = InterventionConfig(layers=(0, 2), rank=3, positions="f1+l1", share_weights=False)


@pytest.fixture(scope="module")
def fingerprint(model):
    return fingerprint_model(model)


def rewrite(payload: bytes, edit_manifest=None, edit_tensors=None) -> bytes:
    """Re-encode an artifact after editing its manifest or tensors (without fixing the digest)."""
    header_len = struct.unpack("<Q", payload[:8])[0]
    manifest = json.loads(json.loads(payload[8 : 8 + header_len])["__metadata__"][MANIFEST_KEY])
    tensors = safetensors.torch.load(payload)
    if edit_manifest:
        edit_manifest(manifest)
    if edit_tensors:
        edit_tensors(tensors)
    return safetensors.torch.save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest)})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_is_identity(tmp_path, model, fingerprint, dtype) -> None:
    intervention = random_intervention(InterventionConfig.from_dict(CONFIG.to_dict() | {"dtype": dtype}))
    path = tmp_path / "a.safetensors"
    saved = save_artifact(path, intervention, fingerprint, {"note": "x", "final_loss": 0.5})
    loaded = load_artifact(path, base_model=fingerprint)
    assert loaded.digest == saved.digest and loaded.training == {"note": "x", "final_loss": 0.5}
    assert loaded.intervention.config == intervention.config
    for unit, weights in intervention.units.items():
        for ours, theirs in zip(loaded.intervention.units[unit].as_tuple(), weights.as_tuple()):
            assert torch.equal(ours, theirs.to(intervention.config.torch_dtype))
    if dtype == "float32":  # bit-identical weights -> identical generations
        prompts = [[3, 4, 5, 6, 7]]
        assert generate(model, prompts, [loaded.intervention]) == generate(model, prompts, [intervention])
    assert not list(tmp_path.glob("*.tmp")), "atomic save leaves no temp file"


def test_encoding_is_deterministic(fingerprint) -> None:
    intervention = random_intervention(CONFIG)
    assert encode_artifact(intervention, fingerprint)[0] == encode_artifact(intervention, fingerprint)[0]


def _good(fingerprint) -> bytes:
    return encode_artifact(random_intervention(CONFIG), fingerprint)[0]


def _nan(tensors):
    tensors["layer.0.prefix.W"][0, 0] = float("nan")


def _shape(tensors):
    tensors["layer.0.prefix.R"] = torch.zeros(2, 64)


def _missing(tensors):
    del tensors["layer.2.suffix.b"]


def _dtype(tensors):
    tensors["layer.0.prefix.b"] = tensors["layer.0.prefix.b"].double()


@pytest.mark.parametrize(
    "mutate,error,fragment",
    [
        (lambda p: b"not a safetensors file", ArtifactFormatError, "safetensors"),
        (lambda p: b"\x00" * 4, ArtifactFormatError, "header"),
        (lambda p: struct.pack("<Q", 1 << 40) + p[8:], ArtifactFormatError, "implausible"),
        (lambda p: safetensors.torch.save({"x": torch.zeros(2)}), ArtifactFormatError, "not a reft-serve artifact"),
        (lambda p: p[:-7], ArtifactFormatError, "corrupt"),
        (lambda p: rewrite(p, edit_tensors=_nan), ArtifactIntegrityError, "NaN"),
        (lambda p: rewrite(p, edit_tensors=_shape), ArtifactFormatError, "shape"),
        (lambda p: rewrite(p, edit_tensors=_missing), ArtifactFormatError, "missing ['layer.2.suffix.b']"),
        (lambda p: rewrite(p, edit_tensors=_dtype), ArtifactFormatError, "float32"),
        (lambda p: rewrite(p, lambda m: m.update(format_version=FORMAT_VERSION + 1)), UnsupportedFormatVersionError, "format_version 2"),
        (lambda p: rewrite(p, lambda m: m.update(format="other")), ArtifactFormatError, "format"),
        (lambda p: rewrite(p, lambda m: m["config"].update(positions="z9")), ArtifactFormatError, "positions"),
        (lambda p: rewrite(p, lambda m: m.pop("hidden_size")), ArtifactFormatError, "hidden_size"),
        (lambda p: rewrite(p, lambda m: m["training"].update(tampered=True)), ArtifactIntegrityError, "digest"),
        (lambda p: rewrite(p, edit_tensors=lambda t: t["layer.0.prefix.W"].mul_(2)), ArtifactIntegrityError, "digest"),
    ],
)
def test_malformed_artifacts_are_refused(fingerprint, mutate, error, fragment) -> None:
    with pytest.raises(error) as info:
        decode_artifact(mutate(_good(fingerprint)), base_model=fingerprint)
    assert fragment in str(info.value)


def test_forward_compatible_manifest_keys_are_ignored(fingerprint) -> None:
    payload = _good(fingerprint)
    header_len = struct.unpack("<Q", payload[:8])[0]
    manifest = json.loads(json.loads(payload[8 : 8 + header_len])["__metadata__"][MANIFEST_KEY])
    from reft_core.artifact import content_digest

    manifest.pop("digest")
    manifest["future_field"] = {"anything": 1}
    tensors = safetensors.torch.load(payload)
    manifest["digest"] = content_digest(manifest, tensors)
    extended = safetensors.torch.save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest)})
    assert decode_artifact(extended, base_model=fingerprint).intervention.config == CONFIG


def test_other_base_model_is_refused(fingerprint) -> None:
    other = fingerprint_model(tiny_llama(seed=1))
    assert other.weights_sha256 != fingerprint.weights_sha256
    with pytest.raises(IncompatibleBaseModelError, match="weights_sha256"):
        decode_artifact(_good(fingerprint), base_model=other)
    with pytest.raises(IncompatibleBaseModelError, match="hidden size 64 does not match"):
        decode_artifact(_good(fingerprint), base_model=replace(fingerprint, hidden_size=128))
    with pytest.raises(IncompatibleBaseModelError, match=r"layers \[2\] out of range"):
        decode_artifact(_good(fingerprint), base_model=replace(fingerprint, num_layers=2))
    assert decode_artifact(_good(fingerprint)).base_model == fingerprint  # no expectation: accepted as is


def test_fingerprint_is_dtype_independent(model, fingerprint) -> None:
    assert fingerprint_model(tiny_llama().to(torch.bfloat16)) == fingerprint
