"""Test helpers shared across test modules (a module, not conftest.py imported as a library)."""

from __future__ import annotations

import io
import zipfile

import torch

from reft_core.artifact import encode_artifact
from reft_core.config import InterventionConfig
from reft_core.fingerprint import ModelFingerprint
from reft_core.intervention import Intervention, UnitWeights
from tests import tiny


def zip_of(members: dict[str, bytes]) -> bytes:
    """A deflated zip archive of `members` (name -> bytes), built in memory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def random_intervention(config: InterventionConfig, seed: int = 0, hidden: int = tiny.HIDDEN, scale: float = 1.0) -> Intervention:
    """Seeded random LoReFT weights for `config`: R with orthonormal rows, W and b normal times `scale`."""
    generator = torch.Generator().manual_seed(seed)
    units = {}
    for unit in config.units():
        q, _ = torch.linalg.qr(torch.randn(hidden, config.rank, generator=generator))
        units[unit] = UnitWeights(
            R=q.T.contiguous(),
            W=scale * torch.randn(config.rank, hidden, generator=generator),
            b=scale * torch.randn(config.rank, generator=generator),
        )
    return Intervention(config=config, hidden_size=hidden, units=units)


def artifact_for(fingerprint: ModelFingerprint, config: InterventionConfig, seed: int = 0, scale: float = 1.0) -> bytes:
    """The bytes of a valid `.safetensors` artifact of a random intervention for the model with `fingerprint`."""
    return encode_artifact(random_intervention(config, seed, fingerprint.hidden_size, scale), fingerprint)[0]
