"""Calendar periods for quotas: a day from local midnight, a week from Monday 00:00, a
month from the 1st at 00:00, all in one time zone and correct across daylight saving.

A quota like "1,000 orders a day in Europe/Berlin" resets when the wall clock there reads
00:00, so its periods are 23 or 25 hours long on DST days. Their bounds are found by
localizing a wall-clock midnight with zoneinfo, with two corrections that zoneinfo's own
arithmetic gets wrong or leaves open:

- A midnight that does not exist (clocks jump from 00:00 to 01:00, as in America/Havana
  every March or America/Sao_Paulo until 2019) starts the period at the first instant
  that does: the transition. zoneinfo would silently map it to 01:00 or to 23:00.
- A midnight that occurs twice (clocks fall back from 01:00 to 00:00, as in America/Havana
  every November) starts the period at its first occurrence (fold=0), so no instant is
  counted twice and none falls between two periods.

Everything here is pure and synchronous; `PeriodClock` makes the per-request call a
comparison while the period has not changed.
"""

from __future__ import annotations

import datetime as dt
import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_SECOND = dt.timedelta(seconds=1)
_MILLISECOND = dt.timedelta(milliseconds=1)


@dataclass(frozen=True, slots=True)
class Period:
    """One calendar period of a quota; its id names the counter in the store."""

    id: str  # stable, sortable: "d2026-12-02", "w2026-11-30" (its Monday), "m2026-12"
    start_ms: int  # Unix ms of its first instant
    end_ms: int  # Unix ms of the next period's first instant (exclusive)

    @property
    def seconds(self) -> int:
        """Its real length: 82800 or 90000 for a day on which the clocks change."""
        return (self.end_ms - self.start_ms) // 1000


@functools.lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo:
    """The time zone called `name` (an IANA name such as "Europe/Berlin", or "UTC").

    Cached: config loading and per-org overrides resolve the same few names again and
    again. A bad name raises ValueError naming it (with a suggestion when one is close),
    whatever zoneinfo raised: it raises KeyError, ValueError or OSError by case ("Europe"
    is a directory, "zone.tab" is not a zone file).
    """
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(_unknown_zone_message(name)) from None


def _unknown_zone_message(name: str) -> str:
    """The error for a bad zone name; slow (it lists the tz database), so only on errors."""
    message = f"unknown time zone {name!r}; expected an IANA name like 'Europe/Berlin' or 'UTC'"
    known = {known.lower(): known for known in available_timezones()}
    close = difflib.get_close_matches(name.strip().lower(), known, n=1, cutoff=0.8)
    if close:
        message += f" (did you mean {known[close[0]]!r}?)"
    return message


def _to_ms(instant: dt.datetime) -> int:
    """Unix ms of an aware datetime, in integers (a float timestamp would round)."""
    return (instant - _EPOCH) // _MILLISECOND


def _local_date(tz: ZoneInfo, unix_ms: int) -> dt.date:
    """The date the wall clock in `tz` shows at `unix_ms`."""
    return (_EPOCH + dt.timedelta(milliseconds=unix_ms)).astimezone(tz).date()


def _wall(instant_s: int, tz: ZoneInfo) -> dt.datetime:
    """The naive wall-clock time in `tz` at Unix second `instant_s`."""
    return (_EPOCH + dt.timedelta(seconds=instant_s)).astimezone(tz).replace(tzinfo=None)


def _midnight_ms(day: dt.date, tz: ZoneInfo) -> int:
    """Unix ms of the first instant of `day` in `tz`.

    Usually that is 00:00 local; for a midnight that occurs twice it is the first
    occurrence (fold=0 takes the offset in force before the clocks fell back: the earlier
    instant). A midnight that does not exist fails the round trip local -> UTC -> local
    (zoneinfo maps it with one of the two offsets around the gap, landing after it), and
    the day starts at the transition instead.
    """
    midnight = dt.datetime(day.year, day.month, day.day)
    instant = midnight.replace(tzinfo=tz).astimezone(dt.UTC)
    if instant.astimezone(tz).replace(tzinfo=None) == midnight:
        return _to_ms(instant)
    return _gap_end_s(midnight, tz) * 1000


def _gap_end_s(wall: dt.datetime, tz: ZoneInfo) -> int:
    """Unix second of the transition that skipped the nonexistent local time `wall`.

    With the offset after the gap (fold=1) `wall` maps to an instant before the
    transition, with the offset before it (fold=0) to one at or after it; the transition
    is the first instant between them whose wall clock reads `wall` or later. Bisected
    in whole seconds, the unit of the tz database (a day-long gap, as in Pacific/Apia on
    2011-12-30, takes 17 steps).
    """
    before = (wall.replace(tzinfo=tz, fold=1) - _EPOCH) // _SECOND
    after = (wall.replace(tzinfo=tz, fold=0) - _EPOCH) // _SECOND
    while after - before > 1:
        middle = (before + after) // 2
        if _wall(middle, tz) >= wall:
            after = middle
        else:
            before = middle
    return after


# A unit's bounds around a local date: (its first date, the next period's, the id).
_Span = Callable[[dt.date], tuple[dt.date, dt.date, str]]


def _day(today: dt.date) -> tuple[dt.date, dt.date, str]:
    return today, today + dt.timedelta(days=1), f"d{today.isoformat()}"


def _week(today: dt.date) -> tuple[dt.date, dt.date, str]:
    """ISO weeks: Monday to Monday, named after the Monday (which sorts across years)."""
    monday = today - dt.timedelta(days=today.weekday())
    return monday, monday + dt.timedelta(days=7), f"w{monday.isoformat()}"


def _month(today: dt.date) -> tuple[dt.date, dt.date, str]:
    first = today.replace(day=1)
    following = dt.date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return first, following, f"m{first.year:04d}-{first.month:02d}"


_SPANS: dict[str, _Span] = {"day": _day, "week": _week, "month": _month}


def _period(span: _Span, today: dt.date, tz: ZoneInfo) -> Period:
    first, following, period_id = span(today)
    return Period(period_id, _midnight_ms(first, tz), _midnight_ms(following, tz))


def period_at(unit: str, tz: ZoneInfo, unix_ms: int) -> Period:
    """The period of `unit` ("day", "week" or "month") in `tz` holding instant `unix_ms`.

    An instant exactly at a period's end belongs to the next one. The period is the one
    of the local date at `unix_ms`, except after a fall-back across midnight (America/
    St_Johns until 2011 went from 00:01 back to 23:01): the repeated hour shows the
    previous date, but the next day began at the first 00:00, so it is the next period.
    """
    span = _SPANS.get(unit)
    if span is None:
        raise ValueError(f"unknown period unit {unit!r}; expected 'day', 'week' or 'month'")
    period = _period(span, _local_date(tz, unix_ms), tz)
    while unix_ms >= period.end_ms:
        period = _period(span, span(_local_date(tz, period.end_ms))[0], tz)
    return period


class PeriodClock:
    """`period_at` with a memory, for the request path.

    It keeps the last period of each (unit, zone) and answers from it while the instant
    is inside it: two comparisons instead of time-zone conversions. An instant past its
    end, or before its start (a clock stepped back), is looked up again. The map has one
    entry per (unit, zone object) used, so it stays as small as the config when zones
    come from `zone()`. Each instance has its own memory; there is no module state.
    """

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[tuple[str, ZoneInfo], Period] = {}

    def period(self, unit: str, tz: ZoneInfo, unix_ms: int) -> Period:
        """The period of `unit` in `tz` holding `unix_ms` (see `period_at`)."""
        key = (unit, tz)
        last = self._last.get(key)
        if last is not None and last.start_ms <= unix_ms < last.end_ms:
            return last
        period = period_at(unit, tz, unix_ms)
        self._last[key] = period
        return period
