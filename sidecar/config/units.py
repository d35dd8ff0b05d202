"""Durations and sizes as written in the config file, and back again for display.

Parsing is strict on purpose: a bare `timeout: 15` is rejected rather than guessed (seconds?
milliseconds?), and unit spellings are case-sensitive so `10mb` cannot silently mean MB or MiB.
Arithmetic goes through Decimal so `1.1s` or `0.1KiB` are judged exactly, not via binary floats.
"""

from __future__ import annotations

import re
from decimal import Decimal

__all__ = [
    "DURATION_EXPECTED",
    "SIZE_EXPECTED",
    "UnitError",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_size",
]

DURATION_EXPECTED = "a duration like 250ms, 15s or 24h"
SIZE_EXPECTED = "a size like 512B, 64KiB or 10MiB"

# Largest first: compound durations must be written in this order, each unit at most once.
_DURATION_UNITS: dict[str, Decimal] = {
    "d": Decimal(86400),
    "h": Decimal(3600),
    "m": Decimal(60),
    "s": Decimal(1),
    "ms": Decimal("0.001"),
}
_DURATION_RANK = {unit: rank for rank, unit in enumerate(_DURATION_UNITS)}
# "ms" is tried before "m" so `250ms` is not read as 250 minutes followed by junk.
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)")
_DURATION = re.compile(rf"(?:{_DURATION_PART.pattern})+")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")

_SIZE_UNITS: dict[str, int] = {
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
}
_SIZE_SPELLINGS = {unit.lower(): unit for unit in _SIZE_UNITS}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)([A-Za-z]*)")


class UnitError(ValueError):
    """A duration or size that does not parse; `hint` says why when there is more to say."""

    def __init__(self, expected: str, text: str, hint: str = "") -> None:
        self.expected = expected
        self.text = text
        self.hint = hint
        suffix = f" ({hint})" if hint else ""
        super().__init__(f"expected {expected}, got {text!r}{suffix}")


def parse_duration(text: str) -> float:
    """`250ms`, `15s`, `1.5s`, `5m`, `24h`, `1d` or a compound like `1h30m`, in float seconds."""
    if not _DURATION.fullmatch(text):
        raise UnitError(DURATION_EXPECTED, text, _duration_hint(text))
    total = Decimal(0)
    last_rank = -1
    for number, unit in _DURATION_PART.findall(text):
        rank = _DURATION_RANK[unit]
        if rank <= last_rank:
            hint = "units go from largest to smallest, each at most once, e.g. 1h30m"
            raise UnitError(DURATION_EXPECTED, text, hint)
        last_rank = rank
        total += Decimal(number) * _DURATION_UNITS[unit]
    return float(total)


def _duration_hint(text: str) -> str:
    if text.startswith("-"):
        return "durations cannot be negative"
    if _NUMBER.fullmatch(text):
        return f"a duration needs a unit, e.g. {text.lstrip('+')}s"
    return ""


def parse_size(text: str) -> int:
    """`512B`, `64KiB`, `10MiB`, `1GiB` (binary) or `64KB`, `10MB` (decimal); digits alone are
    bytes. A fraction is fine as long as it comes out to whole bytes (`1.5KiB` is 1536)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        hint = "sizes cannot be negative" if text.startswith("-") else ""
        raise UnitError(SIZE_EXPECTED, text, hint)
    number, unit = match.groups()
    if unit and unit not in _SIZE_UNITS:
        raise UnitError(SIZE_EXPECTED, text, _size_unit_hint(number, unit))
    exact = Decimal(number) * _SIZE_UNITS[unit or "B"]
    if exact != exact.to_integral_value():
        raise UnitError(SIZE_EXPECTED, text, f"{text} is not a whole number of bytes")
    return int(exact)


def _size_unit_hint(number: str, unit: str) -> str:
    spelling = _SIZE_SPELLINGS.get(unit.lower())
    if spelling is not None:
        return f"units are case-sensitive: did you mean {number}{spelling}?"
    return "units are B, KiB, MiB, GiB, TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000)"


def format_duration(seconds: float) -> str:
    """The shortest spelling `parse_duration` reads back as the same value (to the millisecond)."""
    millis = round(seconds * 1000)
    if millis % 1000:
        return f"{millis}ms" if millis < 1000 else f"{Decimal(millis) / 1000}s"
    whole = millis // 1000
    if whole == 0:
        return "0s"
    parts: list[str] = []
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, whole = divmod(whole, factor)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def format_size(size: int) -> str:
    """Bytes in the largest binary unit that divides them exactly (`1MiB`, `1536B` stays)."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        factor = _SIZE_UNITS[unit]
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"
