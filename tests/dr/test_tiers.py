"""Retention tiers (pydr.dr.tiers): which points a policy's keep tiers keep."""

import calendar
import json
import math
import random

import pytest

from pydr.dr.tiers import Tiers, parse_keep, points_to_keep
from pydr.errors import InvalidArgument


def utc(*fields):
    """Epoch seconds of a UTC date and time (year, month, day, hour=0, minute=0)."""
    fields = fields + (0,) * (6 - len(fields))
    return float(calendar.timegm(fields))


def ids_at(times):
    """Points (id, data time) numbered from 1 in time order, as cycles make them."""
    return [(i + 1, t) for i, t in enumerate(sorted(times))]


@pytest.mark.parametrize("within", [0, -1, math.nan, math.inf, True, "5m", [1]])
def test_within_must_be_a_duration(within):
    with pytest.raises(InvalidArgument, match="keep-within"):
        parse_keep(within=within)


@pytest.mark.parametrize("field", ["hourly", "daily", "weekly", "monthly"])
@pytest.mark.parametrize("count", [-1, 100_001, 1.5, True, "3", None])
def test_counts_must_be_small_ints(field, count):
    with pytest.raises(InvalidArgument, match=f"keep-{field}"):
        parse_keep(**{field: count})


def test_parse_and_dict_round_trip_through_json():
    tiers = parse_keep(within=1800, hourly=24, daily=30, weekly=8, monthly=12)
    assert tiers == Tiers(1800.0, 24, 30, 8, 12)
    assert Tiers.from_dict(json.loads(json.dumps(tiers.to_dict()))) == tiers
    assert tiers.describe() == "all of 1800 s, 24 hourly, 30 daily, 8 weekly, 12 monthly"
    assert Tiers().describe() == "the newest point only"
    for bad in ({"within": 5, "yearly": 2}, [("hourly", 2)], None, {"hourly": -3}):
        with pytest.raises(InvalidArgument):
            Tiers.from_dict(bad)


def test_no_points_keep_nothing_and_the_newest_always_stays():
    assert points_to_keep([], Tiers(hourly=5), 1e9) == set()
    points = ids_at([utc(2026, 3, 1, h) for h in range(5)])
    assert points_to_keep(points, Tiers(), utc(2027, 1, 1)) == {5}


def test_within_keeps_every_point_that_young_boundary_included():
    now = utc(2026, 3, 1, 12)
    points = ids_at([now - 3600, now - 1800, now - 1799, now - 60])
    assert points_to_keep(points, Tiers(within=1800), now) == {2, 3, 4}


def test_hourly_keeps_the_newest_point_of_each_of_the_last_hours():
    # every 10 minutes from 00:00 to 03:50
    points = ids_at([utc(2026, 3, 1, 0, m) for m in range(0, 240, 10)])
    now = utc(2026, 3, 1, 4)
    # the newest of 03:xx, 02:xx, 01:xx: 03:50, 02:50, 01:50
    assert points_to_keep(points, Tiers(hourly=3), now) == {24, 18, 12}
    assert points_to_keep(points, Tiers(hourly=10), now) == {24, 18, 12, 6}


def test_a_gap_does_not_use_up_a_tier():
    """restic's rule: the N most recent periods that have a point (a site
    down for a day keeps its older points)."""
    points = ids_at([utc(2026, 3, 1, 0, 30), utc(2026, 3, 1, 1, 30), utc(2026, 3, 1, 10, 30)])
    assert points_to_keep(points, Tiers(hourly=3), utc(2026, 3, 1, 11)) == {1, 2, 3}
    assert points_to_keep(points, Tiers(hourly=2), utc(2026, 3, 1, 11)) == {2, 3}


def test_days_weeks_and_months_are_utc_calendar_periods():
    times = [utc(2026, 12, 28, 23, 59),  # Monday: ISO week 2026-W53
             utc(2026, 12, 31, 22),       # Thursday, same ISO week, last of December
             utc(2027, 1, 1, 1),          # Friday: still ISO week 2026-W53, a new month
             utc(2027, 1, 4, 0, 1)]       # Monday: 2027-W01
    points = ids_at(times)
    now = utc(2027, 1, 5)
    assert points_to_keep(points, Tiers(daily=3), now) == {4, 3, 2}
    assert points_to_keep(points, Tiers(weekly=2), now) == {4, 3}
    assert points_to_keep(points, Tiers(monthly=2), now) == {4, 2}
    assert points_to_keep(points, Tiers(monthly=1), now) == {4}


def test_tiers_add_up_and_order_does_not_matter():
    rng = random.Random(4)
    start = utc(2026, 1, 1)
    times = sorted(start + rng.uniform(0, 90 * 86400) for _ in range(400))
    points = ids_at(times)
    now = times[-1] + 120
    tiers = Tiers(within=7200, hourly=12, daily=14, weekly=6, monthly=3)
    keep = points_to_keep(points, tiers, now)
    shuffled = points[:]
    rng.shuffle(shuffled)
    assert points_to_keep(shuffled, tiers, now) == keep
    union = {400}
    for part in (Tiers(within=7200), Tiers(hourly=12), Tiers(daily=14), Tiers(weekly=6),
                 Tiers(monthly=3)):
        union |= points_to_keep(points, part, now)
    assert keep == union
    # each daily pick is the newest point of its UTC day
    for pid in points_to_keep(points, Tiers(daily=14), now):
        day = int(times[pid - 1] // 86400)
        assert all(int(t // 86400) != day or t <= times[pid - 1] for t in times)
    assert len(keep) < len(points)


def test_points_at_the_same_time_keep_the_newer_id():
    points = [(7, 1000.0), (8, 1000.0)]
    assert points_to_keep(points, Tiers(), 2000.0) == {8}
