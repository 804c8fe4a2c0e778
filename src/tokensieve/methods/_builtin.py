"""Importing this module registers every built-in method (one file per method)."""

from . import divprune, fastv, pool, random  # noqa: F401
