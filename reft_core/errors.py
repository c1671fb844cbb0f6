"""Typed errors that callers of reft_core can cause.

Each error says what is wrong and, where it helps, what would fix it. The server maps these classes to HTTP
statuses in one table; nothing in reft_core knows about HTTP.
"""

from __future__ import annotations


class ReftError(Exception):
    """Base class for every error reft_core raises on bad input."""


class InvalidConfigError(ReftError, ValueError):
    """An intervention config (layers, positions, rank, dtype, ...) is malformed or out of range."""


class RankLimitError(InvalidConfigError):
    """An intervention's rank is above what the serving side accepts (a configured cap, or the hidden size)."""


class ArtifactError(ReftError):
    """An artifact cannot be used; subclasses say why."""


class ArtifactFormatError(ArtifactError):
    """The file is not a well-formed artifact: bad header, missing/extra tensor, wrong shape or dtype."""


class UnsupportedFormatVersionError(ArtifactError):
    """The artifact was written by a newer (or unknown) format version than this build reads."""


class ArtifactIntegrityError(ArtifactError):
    """The artifact's content does not match its digest, or its weights contain NaN/Inf."""


class IncompatibleBaseModelError(ArtifactError):
    """The artifact was trained for another base model (hidden size, layer count or weights differ)."""


class PyreftImportError(ArtifactError):
    """A pyreft save directory cannot be imported (unsupported intervention type, unsafe pickle, ...)."""


class ModelLoadError(ReftError):
    """The base model cannot be found, converted or loaded."""
