"""Type checks for values that come from JSON or a caller: Python counts True as the integer 1,
so a flag must never pass for a number."""

from __future__ import annotations


def is_number(value) -> bool:
    """An int or float, never a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value) -> bool:
    """An int, never a bool."""
    return isinstance(value, int) and not isinstance(value, bool)
