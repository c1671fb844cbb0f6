"""Base model resolution and loading: local dirs, refusals, atomic GGUF conversion, frozen weights, fingerprints."""

from __future__ import annotations

import pytest
import torch

from reft_core import base_model
from reft_core.base_model import load_base_model, resolve_model_dir
from reft_core.errors import ModelLoadError
from tests import tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny.save_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def test_local_hf_directory_is_used_as_is(tiny_dir, tmp_path) -> None:
    assert resolve_model_dir(tiny_dir, cache_dir=tmp_path) == tiny_dir


@pytest.mark.parametrize("spec", ["HuggingFaceTB/SmolLM2-135M-Instruct", "missing/dir", "empty"])
def test_no_hub_and_no_guessing(tmp_path, spec) -> None:
    (tmp_path / "empty").mkdir()
    target = tmp_path / "empty" if spec == "empty" else spec
    with pytest.raises(ModelLoadError, match="no model hub access|expected an HF model directory"):
        resolve_model_dir(target, cache_dir=tmp_path / "cache")


def test_load_freezes_weights_and_fingerprint_ignores_dtype(tiny_dir, tmp_path) -> None:
    fp32 = load_base_model(tiny_dir, device="cpu", dtype="float32", cache_dir=tmp_path)
    bf16 = load_base_model(tiny_dir, device="cpu", dtype="bfloat16", cache_dir=tmp_path)
    assert not any(p.requires_grad for p in fp32.model.parameters())
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert fp32.fingerprint == bf16.fingerprint and fp32.num_layers == tiny.LAYERS
    other = tiny.save_tiny_model_dir(tmp_path / "other", seed=1)
    assert load_base_model(other, device="cpu", cache_dir=tmp_path).fingerprint != fp32.fingerprint
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_base_model(tiny_dir, device="cpu", dtype="float8", cache_dir=tmp_path)


def test_killed_conversion_leaves_no_cache_entry(tmp_path, monkeypatch) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF not really")
    calls = []

    def failing_convert(source, target) -> None:
        calls.append(target)
        staging = target.parent / f".{target.name}.x.partial"
        staging.mkdir(parents=True)
        (staging / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # killed mid-way

    monkeypatch.setattr(base_model, "convert_gguf", failing_convert)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_dir(gguf, cache_dir=tmp_path / "cache")
    assert not calls[0].exists()  # the final directory never appeared

    def working_convert(source, target) -> None:
        target.mkdir(parents=True)
        (target / base_model._COMPLETE_MARKER).write_text("ok")

    monkeypatch.setattr(base_model, "convert_gguf", working_convert)
    resolved = resolve_model_dir(gguf, cache_dir=tmp_path / "cache")
    assert resolved == calls[0] and resolve_model_dir(gguf, cache_dir=tmp_path / "cache") == resolved
