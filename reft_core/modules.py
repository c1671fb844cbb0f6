"""Trainable interventions: `nn.Module`s used only while training, exported to plain `Intervention` weights.

LoReFT keeps R's rows orthonormal with torch's orthogonal parametrization (as pyreft does); NoReFT and DiReFT train
R freely. The forward is the same pure function the bank folds (reft_core.functional), so training and serving
cannot drift apart.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from reft_core.config import InterventionConfig, Unit
from reft_core.functional import direft, loreft
from reft_core.intervention import Intervention, UnitWeights


class TrainableUnit(nn.Module):
    def __init__(self, kind: str, hidden_size: int, rank: int) -> None:
        super().__init__()
        self.kind = kind
        self.rotation = nn.Linear(hidden_size, rank, bias=False)  # R: [r, d]
        self.source = nn.Linear(hidden_size, rank)  # W: [r, d], b: [r]
        nn.init.orthogonal_(self.rotation.weight)
        if kind == "loreft":
            parametrizations.orthogonal(self.rotation)

    def forward(self, h: Tensor) -> Tensor:
        # h: [..., d] -> edited h: [..., d]
        R, W, b = self.rotation.weight, self.source.weight, self.source.bias
        return direft(h, R, W, b) if self.kind == "direft" else loreft(h, R, W, b)

    def export(self) -> UnitWeights:
        with torch.no_grad():
            return UnitWeights(
                self.rotation.weight.detach().clone(),
                self.source.weight.detach().clone(),
                self.source.bias.detach().clone(),
            )


class TrainableIntervention(nn.Module):
    def __init__(self, config: InterventionConfig, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.unit_list = config.units()
        self.unit_modules = nn.ModuleList(TrainableUnit(config.type, hidden_size, config.rank) for _ in self.unit_list)

    def units(self) -> list[tuple[Unit, TrainableUnit]]:
        return list(zip(self.unit_list, self.unit_modules))

    def export(self) -> Intervention:
        weights = {unit: module.export() for unit, module in self.units()}
        return Intervention(self.config, self.hidden_size, weights)
