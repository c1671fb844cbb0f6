"""Composed `model` strings: `a+b` names up to four interventions applied to one row, in the listed order.

Each part is any single `model` string (`name`, `owner/name`, either with `@N`) and resolves exactly as it would
alone, tenancy and public flags included: the registry passes its own single-name lookup in. Names and tenants
cannot contain '+', so the split is unambiguous. What the composition means when two parts edit the same layer
and position is the bank's business (reft_core.bank; docs/architecture.md): the later part sees the earlier
one's output.
"""

from __future__ import annotations

from collections.abc import Callable

from adapters_store import InterventionNotFoundError, InvalidNameError
from server.engine.types import ComposedRef, InterventionRef

SEPARATOR = "+"
MAX_PARTS = 4


class CompositionError(ValueError):
    """A composed `model` string that is malformed whatever exists: too many parts, an empty part, the base model
    as a part (400)."""


class PartNotFoundError(LookupError):
    """One part of a composed `model` string does not resolve for this tenant (404 naming that part only)."""

    def __init__(self, part: str) -> None:
        super().__init__(f"the model '{part}' does not exist")
        self.part = part


def split(model: str) -> list[str] | None:
    """The parts of a composed `model` string, or None when it names one intervention."""
    if SEPARATOR not in model:
        return None
    parts = model.split(SEPARATOR)
    if len(parts) > MAX_PARTS:
        raise CompositionError(f"a composed model has at most {MAX_PARTS} parts joined by '+', got {len(parts)}")
    if not all(parts):
        raise CompositionError("a composed model joins intervention names with '+'; one of its parts is empty")
    return parts


def compose(
    parts: list[str], base_model_id: str, resolve: Callable[[str], InterventionRef | None]
) -> ComposedRef | None:
    """Resolve every part with `resolve` (a single-name lookup); None as soon as one returns None (a cache-only
    lookup that needs the store: the caller asks again with a full lookup)."""
    refs = []
    for part in parts:
        if part == base_model_id:
            raise CompositionError("the base model is not an intervention and cannot be part of a composed model")
        try:
            ref = resolve(part)
        except (InterventionNotFoundError, InvalidNameError):
            raise PartNotFoundError(part) from None
        if ref is None:
            return None
        refs.append(ref)
    return ComposedRef(tuple(refs))
