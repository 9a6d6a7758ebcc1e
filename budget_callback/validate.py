"""Argument checks shared by every constructor: the message names the argument and what is accepted."""

from __future__ import annotations

from collections.abc import Iterable


def positive_int(argument: str, value, optional: bool = False):
    """``value`` if it is a positive int (or None when ``optional``); else ``ValueError`` naming ``argument``."""
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        accepted = "a positive integer" + (" or None" if optional else "")
        raise ValueError(f"`{argument}` must be {accepted}, got {value!r}")
    return value


def one_of(argument: str, value, choices: Iterable):
    """``value`` if it is one of ``choices``; else ``ValueError`` listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{argument}` must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def boolean(argument: str, value):
    """``value`` if it is a bool; else ``ValueError`` (``"False"`` or ``0`` would silently mean something else)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{argument}` must be True or False (a bool), got {value!r}")
    return value
