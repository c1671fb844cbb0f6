"""What differs between the transformers releases we support, decided once by looking at the installed one.

transformers renamed the KV-cache argument of model, decoder-layer and mask functions from `past_key_values` to
`cache` (the old name warns, and goes away in 5.40). Calling with whichever name the installed release declares
keeps us warning-free on new releases and working on old ones.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn


@functools.cache
def _cache_parameter(function: Callable[..., Any]) -> str:
    parameters = inspect.signature(function).parameters  # follows the deprecation wrapper's __wrapped__
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(target: nn.Module | Callable[..., Any], cache: Any) -> dict[str, Any]:
    """`{name: cache}` for calling `target` (a module, through its forward, or a function) with a KV cache."""
    function = type(target).forward if isinstance(target, nn.Module) else target
    return {_cache_parameter(function): cache}
