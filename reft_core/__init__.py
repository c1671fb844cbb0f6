"""reft_core: the ReFT math, position rules, batched bank, artifact format, pyreft import and trainer.

Pure ML: nothing here knows about HTTP or the artifact store.
"""

from reft_core.bank import BankPlan, InterventionBank, RowPlacement
from reft_core.config import InterventionConfig, Unit
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
from reft_core.generate import generate
from reft_core.intervention import Intervention, UnitWeights
from reft_core.positions import PositionSpec

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
