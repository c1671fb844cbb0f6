"""Base-model fingerprint: identifies the frozen model an intervention was trained on.

An intervention edits hidden states of one particular model; applied to another it produces garbage silently. The
fingerprint records the shape facts (architecture, hidden size, layer count, vocab) plus a hash of a sample of a
few weight tensors. Weights are hashed after rounding to bfloat16 so the same checkpoint served in fp32 on CPU and
bf16 on GPU gets the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from reft_core.hooks import decoder_layers

_SAMPLE_ELEMENTS = 65536  # per tensor; enough to tell checkpoints apart, cheap to hash at start-up


@dataclass(frozen=True)
class ModelFingerprint:
    architecture: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    weights_sha256: str

    @property
    def id(self) -> str:
        """Short stable id over every field."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"id": self.id}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFingerprint:
        fields = ("architecture", "hidden_size", "num_layers", "vocab_size", "weights_sha256")
        missing = [f for f in fields if f not in data]
        if missing:
            raise ValueError(f"base-model fingerprint is missing {missing}")
        return cls(**{f: data[f] for f in fields})

    def mismatch(self, other: ModelFingerprint) -> str | None:
        """Human-readable reason why `other` is a different model, or None when they match."""
        diffs = [
            f"{name} {getattr(other, name)!r} != {getattr(self, name)!r}"
            for name in ("architecture", "hidden_size", "num_layers", "vocab_size", "weights_sha256")
            if getattr(self, name) != getattr(other, name)
        ]
        return "; ".join(diffs) or None


def _sample_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    stride = max(1, flat.numel() // _SAMPLE_ELEMENTS)
    sample = flat[::stride][:_SAMPLE_ELEMENTS].to("cpu", torch.bfloat16)
    return sample.view(torch.int16).numpy().tobytes()


def fingerprint_model(model: nn.Module) -> ModelFingerprint:
    config = model.config
    layers = decoder_layers(model)
    digest = hashlib.sha256()
    sampled = [model.get_input_embeddings().weight, *layers[0].parameters(), *layers[-1].parameters()]
    for tensor in sampled:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(_sample_bytes(tensor))
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    return ModelFingerprint(
        architecture=architectures[0],
        hidden_size=int(config.hidden_size),
        num_layers=len(layers),
        vocab_size=int(config.vocab_size),
        weights_sha256=digest.hexdigest(),
    )
