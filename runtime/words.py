"""How messages count things: one place for plurals and for naming the first few of many."""

from __future__ import annotations

SHOWN_ERRORS = 5  # bad rows named in an error; the count says how many there were in all


def plural(count: int, noun: str) -> str:
    """'1 item', '2 items': the count and the noun, in the plural where it is not one."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def first_few(things, separator: str = "; ") -> str:
    """The first SHOWN_ERRORS of things, joined, and how many more there are."""
    more = len(things) - SHOWN_ERRORS
    return (separator.join(str(thing) for thing in things[:SHOWN_ERRORS])
            + (f" (and {more} more)" if more > 0 else ""))
