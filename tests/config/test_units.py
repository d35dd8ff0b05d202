"""Duration and size syntax: what is accepted, what each spelling means, what is refused."""

from __future__ import annotations

import pytest

from sidecar.config import format_duration, format_size, parse_duration, parse_size
from sidecar.config.units import UnitError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0s", 0.0),
        ("0ms", 0.0),
        ("250ms", 0.25),
        ("1ms", 0.001),
        ("15s", 15.0),
        ("1.5s", 1.5),
        ("1.1s", 1.1),
        ("5m", 300.0),
        ("24h", 86400.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1d2h3m4s5ms", 93784.005),
        ("2m30s", 150.0),
        ("0.5h", 1800.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("fast", ""),
        ("", ""),
        ("15", "a duration needs a unit, e.g. 15s"),
        ("1.5", "a duration needs a unit, e.g. 1.5s"),
        ("-1s", "durations cannot be negative"),
        ("15S", ""),
        ("15 s", ""),
        ("15sec", ""),
        ("1m1h", "units go from largest to smallest, each at most once, e.g. 1h30m"),
        ("1s1s", "units go from largest to smallest, each at most once, e.g. 1h30m"),
        (".5s", ""),
        ("1e3s", ""),
    ],
)
def test_parse_duration_rejects(text: str, hint: str) -> None:
    with pytest.raises(UnitError) as caught:
        parse_duration(text)
    assert caught.value.hint == hint
    suffix = f" ({hint})" if hint else ""
    assert str(caught.value) == f"expected a duration like 250ms, 15s or 24h, got {text!r}{suffix}"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("512", 512),
        ("512B", 512),
        ("64KiB", 65536),
        ("10MiB", 10485760),
        ("1GiB", 1073741824),
        ("1TiB", 1099511627776),
        ("64KB", 64000),
        ("10MB", 10000000),
        ("1GB", 1000000000),
        ("1.5KiB", 1536),
        ("0.5MiB", 524288),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("big", ""),
        ("", ""),
        ("-1", "sizes cannot be negative"),
        ("-1MiB", "sizes cannot be negative"),
        ("10mb", "units are case-sensitive: did you mean 10MB?"),
        ("10mib", "units are case-sensitive: did you mean 10MiB?"),
        (
            "10M",
            "units are B, KiB, MiB, GiB, TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000)",
        ),
        ("1.5", "1.5 is not a whole number of bytes"),
        ("0.1KiB", "0.1KiB is not a whole number of bytes"),
        ("10 MiB", ""),
    ],
)
def test_parse_size_rejects(text: str, hint: str) -> None:
    with pytest.raises(UnitError) as caught:
        parse_size(text)
    assert caught.value.hint == hint
    assert str(caught.value).startswith(f"expected a size like 512B, 64KiB or 10MiB, got {text!r}")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.1, "100ms"),
        (0.25, "250ms"),
        (1.5, "1.5s"),
        (15.0, "15s"),
        (75.0, "1m15s"),
        (300.0, "5m"),
        (5400.0, "1h30m"),
        (86400.0, "1d"),
        (90.5, "90.5s"),
    ],
)
def test_format_duration_round_trips(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0B"),
        (512, "512B"),
        (1536, "1536B"),
        (65536, "64KiB"),
        (10485760, "10MiB"),
        (1073741824, "1GiB"),
        (10000000, "10000000B"),
    ],
)
def test_format_size_round_trips(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text) == size
