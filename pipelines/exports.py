"""Lazy package exports (PEP 562): a job package names what it exports and the module each
comes from; the module loads on first use, so importing the package (the CLI, a Beam
worker unpickling a DoFn) does not import torch or Beam."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, home: dict[str, str]) -> Callable[[str], Any]:
    """The package's ``__getattr__``: ``home`` maps each exported name to its module."""
    def __getattr__(name: str) -> Any:
        if name in home:
            return getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
