"""Package attributes that import their module on first use (PEP 562), so importing a package's light modules does
not pull in torch and transformers with its heavy ones."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, members: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: each name in `members` is imported from the module it maps to when
    first asked for, then kept in the package like an ordinary import."""

    def __getattr__(name: str) -> Any:
        if name not in members:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(members[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
