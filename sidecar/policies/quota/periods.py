"""Calendar periods for quotas: a day from local midnight, a week from Monday 00:00, a
month from the first at 00:00, in a time zone, daylight saving included.

Local midnight is turned into an instant by zoneinfo; a midnight that does not exist (a
DST gap at midnight, as in America/Sao_Paulo until 2019) starts the period at the first
instant that does, and one that occurs twice starts it at the first occurrence.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_UTC = dt.UTC
_GAP_STEP = dt.timedelta(minutes=15)


@dataclass(frozen=True, slots=True)
class Period:
    id: str  # "d2026-12-02", "w2026-11-30" (its Monday), "m2026-12"
    start_ms: int  # Unix ms of its first instant
    end_ms: int  # Unix ms of the next period's first instant (exclusive)

    @property
    def seconds(self) -> int:
        return (self.end_ms - self.start_ms) // 1000


@functools.lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo:
    """The time zone called `name`; ValueError naming it when there is none."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r}; expected an IANA name like Europe/Berlin"
        ) from None


def _instant_of_local_midnight(day: dt.date, tz: ZoneInfo) -> int:
    """Unix ms of `day` 00:00 in `tz` (the first instant of it that exists)."""
    local = dt.datetime(day.year, day.month, day.day, tzinfo=tz)  # fold=0: first occurrence
    instant = local.astimezone(_UTC)
    # A local time that does not exist does not survive the round trip: walk forward to
    # the transition (gaps are whole quarter hours in every zone of the tz database).
    if instant.astimezone(tz).replace(tzinfo=None) != local.replace(tzinfo=None):
        probe = local.replace(tzinfo=None)
        while True:
            probe += _GAP_STEP
            candidate = probe.replace(tzinfo=tz)
            back = candidate.astimezone(_UTC).astimezone(tz).replace(tzinfo=None)
            if back == probe:
                instant = candidate.astimezone(_UTC)
                break
    return int(instant.timestamp() * 1000)


def _first_day(unit: str, today: dt.date) -> tuple[dt.date, dt.date, str]:
    if unit == "day":
        return today, today + dt.timedelta(days=1), f"d{today.isoformat()}"
    if unit == "week":
        monday = today - dt.timedelta(days=today.weekday())
        return monday, monday + dt.timedelta(days=7), f"w{monday.isoformat()}"
    if unit == "month":
        first = today.replace(day=1)
        following = (first + dt.timedelta(days=32)).replace(day=1)
        return first, following, f"m{first.year:04d}-{first.month:02d}"
    raise ValueError(f"unknown period unit {unit!r}")


def period_at(unit: str, tz: ZoneInfo, unix_ms: int) -> Period:
    """The period of `unit` ("day", "week", "month") in `tz` holding the instant `unix_ms`."""
    today = dt.datetime.fromtimestamp(unix_ms / 1000, tz).date()
    first, following, period_id = _first_day(unit, today)
    # An instant whose local date is `first`.. is never before that date's first instant.
    start = _instant_of_local_midnight(first, tz)
    return Period(period_id, start, _instant_of_local_midnight(following, tz))


class PeriodClock:
    """period_at with a memory: while an instant stays inside the last period of a (unit,
    zone), finding its period costs two comparisons, not a time-zone conversion."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], Period] = {}

    def period(self, unit: str, tz: ZoneInfo, unix_ms: int) -> Period:
        key = (unit, tz.key)
        last = self._last.get(key)
        if last is not None and last.start_ms <= unix_ms < last.end_ms:
            return last
        period = period_at(unit, tz, unix_ms)
        self._last[key] = period
        return period
