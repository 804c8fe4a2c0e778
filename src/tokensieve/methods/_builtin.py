"""Importing this module registers every built-in method: each public module of this package is one method."""

import importlib
import pkgutil

_PACKAGE = importlib.import_module(__package__)

for _info in pkgutil.iter_modules(_PACKAGE.__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__package__}.{_info.name}")
