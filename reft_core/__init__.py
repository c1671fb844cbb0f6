"""reft_core: the ReFT math, position rules, batched bank, artifact format, pyreft import and trainer.

Pure ML: nothing here knows about HTTP or the artifact store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reft_core.errors import (
    ArtifactError,
    ArtifactFormatError,
    ArtifactIntegrityError,
    IncompatibleBaseModelError,
    InvalidConfigError,
    ModelLoadError,
    PyreftImportError,
    ReftError,
    UnsupportedFormatVersionError,
)
from reft_core.lazy import lazy_attributes

# The modules that import torch and transformers load on first use, not on `import reft_core`: light modules of
# this package (errors, atomic_io) are imported by the settings and the CLI, and `reft-serve serve` starts its
# engine process before the heavy imports so that both processes import at once (see server.engine.launch).
_LAZY = {"BankPlan": "reft_core.bank", "InterventionBank": "reft_core.bank", "RowPlacement": "reft_core.bank",
         "InterventionConfig": "reft_core.config", "Unit": "reft_core.config", "generate": "reft_core.generate",
         "Intervention": "reft_core.intervention", "UnitWeights": "reft_core.intervention",
         "PositionSpec": "reft_core.positions"}

if TYPE_CHECKING:
    from reft_core.bank import BankPlan, InterventionBank, RowPlacement
    from reft_core.config import InterventionConfig, Unit
    from reft_core.generate import generate
    from reft_core.intervention import Intervention, UnitWeights
    from reft_core.positions import PositionSpec


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "ArtifactError",
    "ArtifactFormatError",
    "ArtifactIntegrityError",
    "BankPlan",
    "IncompatibleBaseModelError",
    "Intervention",
    "InterventionBank",
    "InterventionConfig",
    "InvalidConfigError",
    "ModelLoadError",
    "PositionSpec",
    "PyreftImportError",
    "ReftError",
    "RowPlacement",
    "Unit",
    "UnitWeights",
    "UnsupportedFormatVersionError",
    "generate",
]
