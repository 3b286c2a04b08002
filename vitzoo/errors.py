"""The errors that mean bad input: a missing or malformed file, an unknown or out-of-range setting, a full disk.

Every package's error type subclasses `VitzooError`; the CLI reports a `VitzooError` in one line on stderr with
exit code 2, and lets anything else (a bug) end with its traceback. This module imports nothing heavy (no torch),
so that anything may import it.
"""

from __future__ import annotations

import math


class VitzooError(Exception):
    """Bad input from the user or the environment, reported in one line (exit code 2)."""


class ConfigError(VitzooError, ValueError):
    """A setting that is unknown, of the wrong type or out of range."""


def check_number(
    name: str,
    value,
    kind: type = float,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    error: type[VitzooError] = ConfigError,
) -> None:
    """Raise `error` unless `value` is a finite number of `kind` (int: an integer, not a bool; float: any real
    number) in the range from `low` to `high` (closed ends unless `low_open`/`high_open`; None: unbounded)."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok = is_int if kind is int else (is_int or isinstance(value, float)) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        what = "an integer" if kind is int else "a number"
        if low is not None and high is not None:
            what += f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            what += f" {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            what += f" {'<' if high_open else '<='} {high:g}"
        raise error(f"{name} must be {what}, got {value!r}")
