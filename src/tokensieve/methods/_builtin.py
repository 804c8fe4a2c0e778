"""Importing this module registers every built-in method: each module of this package is one method."""

import importlib
import pkgutil

_SKIP = {"base", "_builtin"}

for _info in pkgutil.iter_modules(__path__ if "__path__" in globals() else importlib.import_module(__package__).__path__):
    if _info.name not in _SKIP and not _info.name.startswith("_"):
        importlib.import_module(f"{__package__}.{_info.name}")
