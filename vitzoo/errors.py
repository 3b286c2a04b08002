"""The errors that mean bad input: a missing or malformed file, an unknown or out-of-range setting, a full disk.

Every package's error type subclasses `VitzooError`; the CLI reports a `VitzooError` in one line on stderr with
exit code 2, and lets anything else (a bug) end with its traceback. This module imports nothing heavy (no torch),
so that anything may import it.
"""

from __future__ import annotations


class VitzooError(Exception):
    """Bad input from the user or the environment, reported in one line (exit code 2)."""


class ConfigError(VitzooError, ValueError):
    """A setting that is unknown, of the wrong type or out of range."""


class CheckpointError(VitzooError, ValueError):
    """A generator or autoencoder checkpoint that is unreadable, or whose metadata is incomplete or inconsistent."""
