"""The intervention config: what an intervention edits (layers, component, positions) and its shape (type, rank).

A frozen dataclass validated on construction, with a JSON round trip (`to_dict` / `from_dict`). It also derives the
list of *units*: one low-rank edit per (layer, position group). With `share_weights=False` and both a prefix and a
suffix (`f1+l1`) pyreft learns two edits per layer, one for the first tokens and one for the last tokens; otherwise
one edit per layer covers all selected positions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from reft_core.errors import InvalidConfigError, RankLimitError
from reft_core.positions import PositionSpec

InterventionType = Literal["loreft", "direft", "noreft"]
PositionGroup = Literal["all", "prefix", "suffix"]

INTERVENTION_TYPES: tuple[str, ...] = ("loreft", "direft", "noreft")
COMPONENTS: tuple[str, ...] = ("block_output",)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_RANK = 1024


def check_rank(rank: int, hidden_size: int, max_rank: int) -> None:
    """Refuse a rank above `max_rank` (a server's limit) or the hidden size: bank tables are padded to the largest
    resident rank, so one high-rank intervention would grow memory for every slot."""
    if rank > hidden_size:
        raise RankLimitError(f"rank {rank} exceeds the model's hidden size {hidden_size}")
    if rank > max_rank:
        raise RankLimitError(f"rank {rank} is above this server's limit of {max_rank} (max_intervention_rank)")


@dataclass(frozen=True)
class Unit:
    """One low-rank edit: applied at `layer` to the positions of `group`."""

    layer: int
    group: PositionGroup

    @property
    def key(self) -> str:
        """Stable name used for tensor keys in artifacts."""
        return f"layer.{self.layer}.{self.group}"


@dataclass(frozen=True)
class InterventionConfig:
    layers: tuple[int, ...]
    rank: int
    positions: str = "l1"
    type: InterventionType = "loreft"
    component: str = "block_output"
    share_weights: bool = False
    dtype: str = "float32"
    position_spec: PositionSpec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        layers = self.layers
        if isinstance(layers, int) or not isinstance(layers, (list, tuple)) or not layers:
            raise InvalidConfigError(f"layers must be a non-empty list of layer indices, got {layers!r}")
        if not all(isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0 for layer in layers):
            raise InvalidConfigError(f"layers must be non-negative integers, got {list(layers)!r}")
        if len(set(layers)) != len(layers):
            raise InvalidConfigError(f"layers must not repeat, got {list(layers)!r}")
        object.__setattr__(self, "layers", tuple(sorted(layers)))
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or not 1 <= self.rank <= MAX_RANK:
            raise InvalidConfigError(f"rank must be an integer in [1, {MAX_RANK}], got {self.rank!r}")
        if self.type not in INTERVENTION_TYPES:
            raise InvalidConfigError(f"type must be one of {list(INTERVENTION_TYPES)}, got {self.type!r}")
        if self.component not in COMPONENTS:
            raise InvalidConfigError(f"component must be one of {list(COMPONENTS)}, got {self.component!r}")
        if self.dtype not in DTYPES:
            raise InvalidConfigError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.share_weights, bool):
            raise InvalidConfigError(f"share_weights must be a boolean, got {self.share_weights!r}")
        object.__setattr__(self, "position_spec", PositionSpec.parse(self.positions))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def groups(self) -> tuple[PositionGroup, ...]:
        if self.position_spec.two_sided and not self.share_weights:
            return ("prefix", "suffix")
        return ("all",)

    def units(self) -> list[Unit]:
        """Units in pyreft's order: every layer's prefix edit, then every layer's suffix edit."""
        return [Unit(layer, group) for group in self.groups for layer in self.layers]

    def positions_for(self, group: PositionGroup, prompt_len: int) -> list[int]:
        spec = self.position_spec
        if group == "prefix":
            return spec.prefix(prompt_len)
        if group == "suffix":
            return spec.suffix(prompt_len)
        return spec.all(prompt_len)

    def check_against_model(self, hidden_size: int, num_layers: int) -> None:
        """Raise InvalidConfigError if this config cannot apply to a model of the given shape."""
        out_of_range = [layer for layer in self.layers if layer >= num_layers]
        if out_of_range:
            raise InvalidConfigError(f"layers {out_of_range} out of range: the base model has {num_layers} layers")
        if self.rank > hidden_size:
            raise InvalidConfigError(f"rank {self.rank} exceeds the model's hidden size {hidden_size}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("position_spec")
        data["layers"] = list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InterventionConfig:
        if not isinstance(data, dict):
            raise InvalidConfigError(f"intervention config must be an object, got {type(data).__name__}")
        known = {"layers", "rank", "positions", "type", "component", "share_weights", "dtype"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidConfigError(f"unknown intervention config fields: {unknown}")
        missing = sorted({"layers", "rank"} - set(data))
        if missing:
            raise InvalidConfigError(f"intervention config is missing required fields: {missing}")
        layers = data["layers"]
        return cls(**{**data, "layers": tuple(layers) if isinstance(layers, list) else layers})
