"""Byte sizes: parse what users type, format what users read.

Internally every size is an ``int`` of bytes. Strings accept SI units
(kB, MB, GB, TB: powers of 1000) and IEC units (KiB, MiB, GiB, TiB: powers
of 1024); a bare number or ``B`` is bytes.
"""

from __future__ import annotations

import re
from fractions import Fraction

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "pb": 1000**5,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "pib": 1024**5,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
MAX_SIZE_BYTES = 2**63 - 1  # the largest size a file system or JSON consumer can hold as an int64
ACCEPTED = "an int of bytes or a string such as '500MB', '12GB' (powers of 1000) or '12GiB' (powers of 1024)"


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_size(value: int | str, argument: str = "size") -> int:
    """Return ``value`` as an int of bytes; raise ``ValueError`` naming ``argument``.

    Parsed exactly (no float rounding, no overflow); at most ``MAX_SIZE_BYTES``.

    >>> parse_size("1.5KiB")
    1536
    >>> parse_size("12GB")
    12000000000
    """
    if isinstance(value, bool):
        raise ValueError(f"`{argument}` must be {ACCEPTED}, got {_shown(value)}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"`{argument}` must be {ACCEPTED}, got {_shown(value)}")
        size = int(Fraction(match.group(1)) * _UNITS[unit])
    else:
        raise ValueError(f"`{argument}` must be {ACCEPTED}, got {_shown(value)}")
    if size <= 0:
        raise ValueError(f"`{argument}` must be a positive size, got {_shown(value)}")
    if size > MAX_SIZE_BYTES:
        raise ValueError(f"`{argument}` must be at most {MAX_SIZE_BYTES:,} bytes (8 EiB), got {_shown(value)}")
    return size


def format_bytes(n: int | None, binary: bool = True) -> str:
    """Human-readable size: ``1.22 MiB`` (binary) or ``1.28 MB`` (decimal)."""
    if n is None:
        return "-"
    base, units = (1024, ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]) if binary else (1000, ["B", "kB", "MB", "GB", "TB", "PB"])
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in units:
        if value < base or unit == units[-1]:
            return f"{sign}{int(value)} {unit}" if unit == "B" else f"{sign}{value:.2f} {unit}"
        value /= base
    raise AssertionError("unreachable")


def format_count(n: int | float | None) -> str:
    """Large counts with SI prefixes: ``124.44M``, ``3.52T``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ["", "K", "M", "G", "T", "P", "E"]:
        if abs(value) < 1000 or unit == "E":
            return f"{int(value)}" if unit == "" else f"{value:.2f}{unit}"
        value /= 1000
    raise AssertionError("unreachable")


def format_seconds(seconds: float | None) -> str:
    """``3 d 04:05:06`` style durations."""
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    text = f"{hours:02d}:{minutes:02d}:{sec:02d}"
    return f"{days} d {text}" if days else text
