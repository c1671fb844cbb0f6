"""An intervention in memory: its config plus the weights of every unit, ready to apply or to save.

This is the inference form (plain tensors, R materialised once); `reft_core.modules` holds the trainable form and
exports to this one. Validation here covers what is true of any intervention; checks against a particular base
model (layer count, hidden size, fingerprint) live in `reft_core.artifact`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from reft_core.config import InterventionConfig, Unit
from reft_core.errors import ArtifactFormatError, ArtifactIntegrityError

WEIGHT_NAMES: tuple[str, ...] = ("R", "W", "b")


@dataclass(frozen=True)
class UnitWeights:
    R: Tensor  # [r, d]
    W: Tensor  # [r, d]
    b: Tensor  # [r]

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.R, self.W, self.b


@dataclass(frozen=True, eq=False)  # identity semantics: tensors do not compare or hash by value
class Intervention:
    config: InterventionConfig
    hidden_size: int
    units: dict[Unit, UnitWeights]

    def __post_init__(self) -> None:
        expected = self.config.units()
        if set(self.units) != set(expected):
            missing = sorted(u.key for u in expected if u not in self.units)
            extra = sorted(u.key for u in self.units if u not in expected)
            raise ArtifactFormatError(f"intervention units do not match its config: missing {missing}, extra {extra}")
        r, d = self.config.rank, self.hidden_size
        for unit, weights in self.units.items():
            for name, tensor, shape in zip(WEIGHT_NAMES, weights.as_tuple(), ((r, d), (r, d), (r,))):
                if tuple(tensor.shape) != shape:
                    raise ArtifactFormatError(
                        f"tensor {unit.key}.{name} has shape {list(tensor.shape)}, expected {list(shape)} "
                        f"(rank {r}, hidden size {d})"
                    )
                if not tensor.is_floating_point():
                    raise ArtifactFormatError(f"tensor {unit.key}.{name} has non-float dtype {tensor.dtype}")
                if not bool(torch.isfinite(tensor).all()):
                    raise ArtifactIntegrityError(f"tensor {unit.key}.{name} contains NaN or Inf")

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for w in self.units.values() for t in w.as_tuple())

    def tensors(self) -> dict[str, Tensor]:
        """Flat name -> tensor map (contiguous, CPU) as stored in an artifact."""
        return {
            f"{unit.key}.{name}": tensor.detach().to("cpu").contiguous()
            for unit, weights in self.units.items()
            for name, tensor in zip(WEIGHT_NAMES, weights.as_tuple())
        }

    @classmethod
    def from_tensors(cls, config: InterventionConfig, hidden_size: int, tensors: dict[str, Tensor]) -> Intervention:
        expected = {f"{u.key}.{n}" for u in config.units() for n in WEIGHT_NAMES}
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or extra:
            raise ArtifactFormatError(f"artifact tensors do not match its config: missing {missing}, extra {extra}")
        units = {
            unit: UnitWeights(*(tensors[f"{unit.key}.{name}"] for name in WEIGHT_NAMES)) for unit in config.units()
        }
        return cls(config=config, hidden_size=hidden_size, units=units)
