"""Calendar periods of quotas: day, week and month bounds in a time zone, across daylight
saving, nonexistent and repeated midnights.

Every expected bound is a literal UTC instant worked out by hand from the zone's known
offsets and transition dates (noted beside each case), never with the code under test.
"""

from __future__ import annotations

import datetime as dt
import itertools

import pytest

from sidecar.policies.quota.periods import Period, PeriodClock, period_at, zone

HOUR_MS = 3_600_000
DAY_S = 86_400


def ms(utc: str) -> int:
    """Unix ms of a literal UTC instant, "2026-03-28T23:00" or with seconds/fraction."""
    instant = dt.datetime.fromisoformat(utc).replace(tzinfo=dt.UTC)
    return (instant - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(milliseconds=1)


def period(period_id: str, start: str, end: str) -> Period:
    return Period(period_id, ms(start), ms(end))


# --- days -------------------------------------------------------------------------------------

DAYS = [
    # Europe/Berlin springs forward on 2026-03-29 at 01:00Z (02:00 CET -> 03:00 CEST):
    # 00:00 CET (+1) to 00:00 CEST (+2) the next day, 23 hours.
    ("Europe/Berlin", "2026-03-29T12:00", "d2026-03-29", "2026-03-28T23:00", "2026-03-29T22:00"),
    # ... and falls back on 2026-10-25 at 01:00Z: 00:00 CEST to 00:00 CET, 25 hours.
    ("Europe/Berlin", "2026-10-25T12:00", "d2026-10-25", "2026-10-24T22:00", "2026-10-25T23:00"),
    # An ordinary winter day (CET, +1).
    ("Europe/Berlin", "2026-12-02T12:00", "d2026-12-02", "2026-12-01T23:00", "2026-12-02T23:00"),
    # An ordinary summer day (CEST, +2).
    ("Europe/Berlin", "2026-07-15T00:00", "d2026-07-15", "2026-07-14T22:00", "2026-07-15T22:00"),
    # 1 ms before midnight CET is still the day; midnight itself is the next one.
    (
        "Europe/Berlin",
        "2026-12-02T22:59:59.999",
        "d2026-12-02",
        "2026-12-01T23:00",
        "2026-12-02T23:00",
    ),
    ("Europe/Berlin", "2026-12-02T23:00", "d2026-12-03", "2026-12-02T23:00", "2026-12-03T23:00"),
    # The first instant of the 23-hour day, and the last of the one before.
    ("Europe/Berlin", "2026-03-28T23:00", "d2026-03-29", "2026-03-28T23:00", "2026-03-29T22:00"),
    (
        "Europe/Berlin",
        "2026-03-28T22:59:59.999",
        "d2026-03-28",
        "2026-03-27T23:00",
        "2026-03-28T23:00",
    ),
    # Inside the repeated hour of 2026-10-25 (02:30 CEST = 00:30Z, 02:30 CET = 01:30Z).
    ("Europe/Berlin", "2026-10-25T00:30", "d2026-10-25", "2026-10-24T22:00", "2026-10-25T23:00"),
    ("Europe/Berlin", "2026-10-25T01:30", "d2026-10-25", "2026-10-24T22:00", "2026-10-25T23:00"),
    # America/New_York springs forward on 2026-03-08 (second Sunday of March) at 07:00Z:
    # 00:00 EST (-5) to 00:00 EDT (-4) the next day, 23 hours.
    ("America/New_York", "2026-03-08T12:00", "d2026-03-08", "2026-03-08T05:00", "2026-03-09T04:00"),
    # ... and falls back on 2026-11-01 (first Sunday of November): 25 hours.
    ("America/New_York", "2026-11-01T12:00", "d2026-11-01", "2026-11-01T04:00", "2026-11-02T05:00"),
    # 23:30 EDT the evening before is still 2026-10-31.
    ("America/New_York", "2026-11-01T03:30", "d2026-10-31", "2026-10-31T04:00", "2026-11-01T04:00"),
    # America/Sao_Paulo on 2018-11-04: clocks went from 00:00 (-3) to 01:00 (-2), so
    # midnight did not exist; the day starts at the transition, 03:00Z, and is 23 hours.
    (
        "America/Sao_Paulo",
        "2018-11-04T12:00",
        "d2018-11-04",
        "2018-11-04T03:00",
        "2018-11-05T02:00",
    ),
    (
        "America/Sao_Paulo",
        "2018-11-04T03:00",
        "d2018-11-04",
        "2018-11-04T03:00",
        "2018-11-05T02:00",
    ),
    (
        "America/Sao_Paulo",
        "2018-11-04T02:59:59.999",
        "d2018-11-03",
        "2018-11-03T03:00",
        "2018-11-04T03:00",
    ),
    # America/Havana: 2026-03-08 at 00:00 CST (-5) -> 01:00 CDT (-4), midnight skipped;
    # 2026-11-01 at 01:00 CDT -> 00:00 CST, midnight twice: the day starts at the first.
    ("America/Havana", "2026-03-08T12:00", "d2026-03-08", "2026-03-08T05:00", "2026-03-09T04:00"),
    ("America/Havana", "2026-11-01T04:30", "d2026-11-01", "2026-11-01T04:00", "2026-11-02T05:00"),
    ("America/Havana", "2026-11-01T05:30", "d2026-11-01", "2026-11-01T04:00", "2026-11-02T05:00"),
    ("America/Havana", "2026-11-01T03:59", "d2026-10-31", "2026-10-31T04:00", "2026-11-01T04:00"),
    # Asia/Kolkata, +5:30 all year.
    ("Asia/Kolkata", "2026-12-02T12:00", "d2026-12-02", "2026-12-01T18:30", "2026-12-02T18:30"),
    ("Asia/Kolkata", "2026-12-02T18:30", "d2026-12-03", "2026-12-02T18:30", "2026-12-03T18:30"),
    (
        "Asia/Kolkata",
        "2026-12-01T18:29:59.999",
        "d2026-12-01",
        "2026-11-30T18:30",
        "2026-12-01T18:30",
    ),
    # Pacific/Kiritimati, +14: its day is the next UTC date for most of the UTC day.
    (
        "Pacific/Kiritimati",
        "2026-12-01T10:00",
        "d2026-12-02",
        "2026-12-01T10:00",
        "2026-12-02T10:00",
    ),
    (
        "Pacific/Kiritimati",
        "2026-12-01T09:59",
        "d2026-12-01",
        "2026-11-30T10:00",
        "2026-12-01T10:00",
    ),
    (
        "Pacific/Kiritimati",
        "2026-12-31T10:00",
        "d2027-01-01",
        "2026-12-31T10:00",
        "2027-01-01T10:00",
    ),
    # Pacific/Apia skipped 2011-12-30: 24:00 on the 29th (-10) became 00:00 on the 31st
    # (+14) at 2011-12-30T10:00Z. The 29th ends there and the 31st begins; no 30th.
    ("Pacific/Apia", "2011-12-29T12:00", "d2011-12-29", "2011-12-29T10:00", "2011-12-30T10:00"),
    ("Pacific/Apia", "2011-12-30T10:00", "d2011-12-31", "2011-12-30T10:00", "2011-12-31T10:00"),
    # Pacific/Kiritimati skipped 1994-12-31 the same way (-10 -> +14 at 1994-12-31T10:00Z).
    (
        "Pacific/Kiritimati",
        "1994-12-30T12:00",
        "d1994-12-30",
        "1994-12-30T10:00",
        "1994-12-31T10:00",
    ),
    (
        "Pacific/Kiritimati",
        "1994-12-31T10:00",
        "d1995-01-01",
        "1994-12-31T10:00",
        "1995-01-01T10:00",
    ),
    # America/St_Johns fell back across midnight on 2010-11-07: 00:01 NDT (-2:30, 02:31Z)
    # became 23:01 NST (-3:30) on the 6th. The 7th began at the first 00:00 (02:30Z); the
    # repeated hour shows the 6th's date but belongs to the 7th, which is 25 hours long.
    ("America/St_Johns", "2010-11-06T12:00", "d2010-11-06", "2010-11-06T02:30", "2010-11-07T02:30"),
    ("America/St_Johns", "2010-11-07T02:29", "d2010-11-06", "2010-11-06T02:30", "2010-11-07T02:30"),
    ("America/St_Johns", "2010-11-07T02:45", "d2010-11-07", "2010-11-07T02:30", "2010-11-08T03:30"),
    ("America/St_Johns", "2010-11-07T03:29", "d2010-11-07", "2010-11-07T02:30", "2010-11-08T03:30"),
    # UTC.
    ("UTC", "2026-12-02T00:00", "d2026-12-02", "2026-12-02T00:00", "2026-12-03T00:00"),
    ("UTC", "2026-12-31T23:59:59.999", "d2026-12-31", "2026-12-31T00:00", "2027-01-01T00:00"),
]


@pytest.mark.parametrize(("name", "at", "period_id", "start", "end"), DAYS)
def test_day_periods(name: str, at: str, period_id: str, start: str, end: str) -> None:
    assert period_at("day", zone(name), ms(at)) == period(period_id, start, end)


def test_dst_days_are_23_and_25_hours_long() -> None:
    berlin = zone("Europe/Berlin")
    assert period_at("day", berlin, ms("2026-03-29T12:00")).seconds == 82_800
    assert period_at("day", berlin, ms("2026-10-25T12:00")).seconds == 90_000
    assert period_at("day", berlin, ms("2026-12-02T12:00")).seconds == DAY_S
    new_york = zone("America/New_York")
    assert period_at("day", new_york, ms("2026-03-08T12:00")).seconds == 82_800
    assert period_at("day", new_york, ms("2026-11-01T12:00")).seconds == 90_000
    sao_paulo = zone("America/Sao_Paulo")
    assert period_at("day", sao_paulo, ms("2018-11-04T12:00")).seconds == 82_800


# --- weeks and months ---------------------------------------------------------------------------

WEEKS_AND_MONTHS = [
    # 2026-12-02 is a Wednesday: its week is Monday 2026-11-30 to Monday 2026-12-07 (CET).
    (
        "week",
        "Europe/Berlin",
        "2026-12-02T12:00",
        "w2026-11-30",
        "2026-11-29T23:00",
        "2026-12-06T23:00",
    ),
    # Monday 00:00 CET starts the week; 1 ms before is the previous one.
    (
        "week",
        "Europe/Berlin",
        "2026-11-29T23:00",
        "w2026-11-30",
        "2026-11-29T23:00",
        "2026-12-06T23:00",
    ),
    (
        "week",
        "Europe/Berlin",
        "2026-11-29T22:59:59.999",
        "w2026-11-23",
        "2026-11-22T23:00",
        "2026-11-29T23:00",
    ),
    # The week of the spring-forward Sunday 2026-03-29: 167 hours.
    (
        "week",
        "Europe/Berlin",
        "2026-03-29T12:00",
        "w2026-03-23",
        "2026-03-22T23:00",
        "2026-03-29T22:00",
    ),
    # Across the new year: Friday 2027-01-01 is in the week of Monday 2026-12-28.
    ("week", "UTC", "2027-01-01T12:00", "w2026-12-28", "2026-12-28T00:00", "2027-01-04T00:00"),
    (
        "month",
        "Europe/Berlin",
        "2026-12-02T12:00",
        "m2026-12",
        "2026-11-30T23:00",
        "2026-12-31T23:00",
    ),
    # December -> January: the first instant of 2027 in Berlin is the next month.
    (
        "month",
        "Europe/Berlin",
        "2026-12-31T23:00",
        "m2027-01",
        "2026-12-31T23:00",
        "2027-01-31T23:00",
    ),
    (
        "month",
        "Europe/Berlin",
        "2026-12-31T22:59:59.999",
        "m2026-12",
        "2026-11-30T23:00",
        "2026-12-31T23:00",
    ),
    # March 2026 in Berlin starts in CET and ends in CEST.
    (
        "month",
        "Europe/Berlin",
        "2026-03-15T12:00",
        "m2026-03",
        "2026-02-28T23:00",
        "2026-03-31T22:00",
    ),
    # February 2028 has 29 days.
    ("month", "UTC", "2028-02-15T12:00", "m2028-02", "2028-02-01T00:00", "2028-03-01T00:00"),
    (
        "month",
        "America/New_York",
        "2028-02-29T12:00",
        "m2028-02",
        "2028-02-01T05:00",
        "2028-03-01T05:00",
    ),
    ("month", "UTC", "2026-02-15T12:00", "m2026-02", "2026-02-01T00:00", "2026-03-01T00:00"),
    (
        "month",
        "Asia/Kolkata",
        "2026-11-30T18:30",
        "m2026-12",
        "2026-11-30T18:30",
        "2026-12-31T18:30",
    ),
]


@pytest.mark.parametrize(("unit", "name", "at", "period_id", "start", "end"), WEEKS_AND_MONTHS)
def test_week_and_month_periods(
    unit: str, name: str, at: str, period_id: str, start: str, end: str
) -> None:
    assert period_at(unit, zone(name), ms(at)) == period(period_id, start, end)


def test_week_and_month_lengths() -> None:
    berlin = zone("Europe/Berlin")
    assert period_at("week", berlin, ms("2026-12-02T12:00")).seconds == 7 * DAY_S
    assert period_at("week", berlin, ms("2026-03-29T12:00")).seconds == 7 * DAY_S - 3600
    assert period_at("month", zone("UTC"), ms("2028-02-15T12:00")).seconds == 29 * DAY_S
    assert period_at("month", berlin, ms("2026-10-15T12:00")).seconds == 31 * DAY_S + 3600


# --- zones and units ---------------------------------------------------------------------------


def test_an_unknown_zone_raises_value_error_with_a_suggestion() -> None:
    with pytest.raises(ValueError, match="Europe/Berln") as raised:
        zone("Europe/Berln")
    assert "Europe/Berlin" in str(raised.value)


@pytest.mark.parametrize("name", ["", "Europe", "Nowhere/City", "zone.tab", "../etc/passwd"])
def test_other_bad_zone_names_raise_value_error(name: str) -> None:
    with pytest.raises(ValueError):
        zone(name)


def test_zone_is_cached() -> None:
    assert zone("Europe/Berlin") is zone("Europe/Berlin")


def test_an_unknown_unit_raises_value_error() -> None:
    with pytest.raises(ValueError, match="hour"):
        period_at("hour", zone("UTC"), 0)


# --- PeriodClock ---------------------------------------------------------------------------------


def test_period_clock_keeps_the_period_until_it_ends() -> None:
    clock, berlin = PeriodClock(), zone("Europe/Berlin")
    first = clock.period("day", berlin, ms("2026-12-02T12:00"))
    assert first == period("d2026-12-02", "2026-12-01T23:00", "2026-12-02T23:00")
    assert clock.period("day", berlin, ms("2026-12-01T23:00")) is first
    assert clock.period("day", berlin, ms("2026-12-02T22:59:59.999")) is first
    following = clock.period("day", berlin, ms("2026-12-02T23:00"))
    assert following == period("d2026-12-03", "2026-12-02T23:00", "2026-12-03T23:00")
    assert following is not first
    assert clock.period("day", berlin, ms("2026-12-03T01:00")) is following
    # A clock stepped back before the period's start looks it up again.
    before = clock.period("day", berlin, ms("2026-12-02T22:59:59.999"))
    assert before == first and before is not following
    assert clock.period("day", berlin, ms("2026-12-02T12:00")) is before


def test_period_clock_remembers_each_unit_and_zone_apart() -> None:
    clock = PeriodClock()
    berlin, kolkata = zone("Europe/Berlin"), zone("Asia/Kolkata")
    day = clock.period("day", berlin, ms("2026-12-02T12:00"))
    month = clock.period("month", berlin, ms("2026-12-02T12:00"))
    india = clock.period("day", kolkata, ms("2026-12-02T12:00"))
    assert month == period("m2026-12", "2026-11-30T23:00", "2026-12-31T23:00")
    assert india == period("d2026-12-02", "2026-12-01T18:30", "2026-12-02T18:30")
    assert clock.period("day", berlin, ms("2026-12-02T13:00")) is day
    assert clock.period("month", berlin, ms("2026-12-20T13:00")) is month
    assert clock.period("day", kolkata, ms("2026-12-02T13:00")) is india
    # Each instance has its own memory.
    assert PeriodClock().period("day", berlin, ms("2026-12-02T13:00")) is not day


# --- a sweep over 2026 ----------------------------------------------------------------------------

SWEEP_ZONES = ["Europe/Berlin", "America/New_York", "Asia/Kolkata", "Pacific/Kiritimati", "UTC"]
LENGTHS = {"day": {23 * 3600, DAY_S, 25 * 3600}, "week": {7 * DAY_S + d for d in (-3600, 0, 3600)}}


@pytest.mark.parametrize("unit", ["day", "week", "month"])
@pytest.mark.parametrize("name", SWEEP_ZONES)
def test_every_hour_of_2026_lies_in_a_period_that_the_next_one_follows(
    name: str, unit: str
) -> None:
    tz = zone(name)
    seen: dict[str, Period] = {}
    for t in range(ms("2026-01-01T00:00"), ms("2027-01-01T00:00"), HOUR_MS):
        for instant in (t, t + 1_799_999):  # on the hour and just before the half hour
            current = period_at(unit, tz, instant)
            assert current.start_ms <= instant < current.end_ms, (instant, current)
            assert seen.setdefault(current.id, current) == current
    ordered = sorted(seen.values(), key=lambda item: item.start_ms)
    assert [item.id for item in ordered] == sorted(seen)  # ids sort as the periods do
    for item in ordered:
        following = period_at(unit, tz, item.end_ms)
        assert following.start_ms == item.end_ms
        assert period_at(unit, tz, item.end_ms - 1) == item
        if unit in LENGTHS:
            assert item.seconds in LENGTHS[unit], item
    for earlier, later in itertools.pairwise(ordered):
        assert earlier.end_ms == later.start_ms
    expected = {"day": 365, "week": 53, "month": 12}[unit]
    # A zone east of UTC sees the last day of 2025 in the first hours; west, 2027's none.
    assert len(seen) - expected in (0, 1)
