"""Cron expressions: checked once, then asked for the ticks after a moment.

APScheduler's `CronTrigger` does the calendar arithmetic; this module fixes what a
crontab user would otherwise trip on, and decides what the daylight-saving
transitions do:

- five fields (minute hour day month weekday), or six with seconds first, or a
  macro (`@hourly`, `@daily`, `@midnight`, `@weekly`, `@monthly`, `@yearly`,
  `@annually`);
- weekdays numbered as crontab numbers them (0 and 7 are Sunday), where
  APScheduler 3 counts from Monday;
- a wall-clock time the clock skips (spring forward) fires once, shifted by the
  skipped hour (02:30 fires at 03:30); a time that occurs twice (fall back) fires
  once, at its first occurrence, unless the hour field starts with `*` (a schedule
  that runs every hour or more often keeps its real-time rhythm through both).

Times are epoch milliseconds, compared as instants (never as wall-clock times).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

from ._errors import InvalidSchedule

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_DAY = r"(?:[0-7]|sun|mon|tue|wed|thu|fri|sat)"
_WEEKDAY_PART = re.compile(
    rf"(?:(?P<all>\*)|(?P<first>{_DAY})(?:-(?P<last>{_DAY}))?)(?:/(?P<step>[1-9][0-9]*))?"
)
# The most ticks passed over in one search: one a second, for two hours (the repeated
# hour after the clocks go back, or the search from before a jump).
_MOST_SKIPPED = 7201
# Searching this far ahead for a tick before giving up (a February 30th never comes).
_HORIZON = timedelta(days=366 * 8)


@dataclass(frozen=True, slots=True)
class Cron:
    """A checked cron expression in a time zone.

    A schedule whose hour field starts with `*` runs on real time: APScheduler's
    trigger in the zone itself. Any other is a calendar of wall-clock times: the
    trigger runs on the naive wall clock (as if it were UTC) and each wall time found
    becomes the instant it first stands for (a skipped one: shifted by the gap).
    """

    expr: str
    timezone: str
    _trigger: CronTrigger  # in the zone (hourly), or on the naive wall clock
    _zone: ZoneInfo
    _repeats_hourly: bool  # the hour field starts with '*'

    def next_after(self, ms: int) -> int | None:
        """The first tick strictly after `ms` (epoch ms), or None if there is none."""
        return self._next_real(ms) if self._repeats_hourly else self._next_wall(ms)

    def _next_real(self, ms: int) -> int | None:
        after = ms
        for _ in range(_MOST_SKIPPED):
            now = datetime.fromtimestamp((after + 1) / 1000, UTC)
            fire = self._trigger.get_next_fire_time(None, now)
            if fire is None:
                return None
            tick: int = round(fire.timestamp() * 1000)
            if tick > after:
                return tick
            after += 1000  # never go back in time, whatever the trigger says
        return None

    def _next_wall(self, ms: int) -> int | None:
        local = datetime.fromtimestamp(ms / 1000, self._zone)
        # Just after the clocks jumped, a wall time of the skipped hour stands for an
        # instant ahead: search from before the jump.
        back = datetime.fromtimestamp(ms / 1000 - 7200, self._zone)
        start = back if back.utcoffset() != local.utcoffset() else local
        wall = start.replace(tzinfo=UTC, fold=0)
        for _ in range(_MOST_SKIPPED):
            fire = self._trigger.get_next_fire_time(None, wall)
            if fire is None:
                return None
            # fold=0: a repeated wall time is its first instant; a skipped one is read
            # with the offset before the jump (02:30 -> 03:30 summer time).
            instant = fire.replace(tzinfo=self._zone, fold=0)
            tick: int = round(instant.timestamp() * 1000)
            if tick > ms:
                return tick
            wall = fire + timedelta(seconds=1)
        return None

    def last_before(self, limit: int, floor: int) -> int | None:
        """The latest tick in [floor, limit), or None (searching back in widening windows)."""
        window = 60_000
        last: int | None = None
        while True:
            start = max(limit - window, floor)
            tick = self.next_after(start - 1)
            while tick is not None and tick < limit:
                last = tick
                tick = self.next_after(tick)
            if last is not None or start == floor:
                return last
            window *= 4


def parse_cron(expr: object, timezone: object = "UTC", *, check_fires: bool = True) -> Cron:
    """Check a cron expression and a time zone name; raise `InvalidSchedule` if either
    is wrong (or, with `check_fires`, if the expression never fires), naming what is
    wrong."""
    if not isinstance(expr, str) or not expr.strip() or len(expr) > 120:
        raise InvalidSchedule(
            f"cron must be a cron expression of 1 to 120 characters, got {expr!r}"
        )
    zone = _zone(timezone)
    fields = MACROS.get(expr.strip().lower(), expr).split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise InvalidSchedule(
            f"cron {expr!r} has {len(fields)} fields; expected 5 (minute hour day month "
            f"weekday), 6 (seconds first) or a macro such as @daily"
        )
    second, minute, hour, day, month, weekday = fields
    day_of_week = _weekdays(weekday, expr)
    try:
        trigger = CronTrigger(
            second=second,
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=day_of_week,
            timezone=zone if hour.startswith("*") else UTC,
        )
    except ValueError as exc:
        raise InvalidSchedule(f"cron {expr!r} is not valid: {exc}") from None
    cron = Cron(expr, str(timezone), trigger, zone, hour.startswith("*"))
    if not check_fires:
        return cron
    now = round(datetime.now(UTC).timestamp() * 1000)
    first = cron.next_after(now)
    if first is None or first - now > _HORIZON / timedelta(milliseconds=1):
        raise InvalidSchedule(f"cron {expr!r} never fires (no tick in the next 8 years)")
    return cron


def _zone(timezone: object) -> ZoneInfo:
    if not isinstance(timezone, str) or not timezone or "\x00" in timezone:
        raise InvalidSchedule(f"timezone must be an IANA time zone name, got {timezone!r}")
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidSchedule(
            f"unknown timezone {timezone!r}; expected an IANA name such as 'Europe/Paris' "
            f"or 'UTC'"
        ) from None


def _weekdays(field: str, expr: str) -> str:
    """A crontab weekday field as APScheduler 3 reads it (names, not numbers: its
    numbers start on Monday)."""
    if field in ("*", "?"):
        return "*"
    days: set[int] = set()
    for part in field.lower().split(","):
        match = _WEEKDAY_PART.fullmatch(part)
        if match is None:
            raise InvalidSchedule(f"cron {expr!r} has an invalid weekday field {field!r}")
        if match["all"]:
            first, last = 0, 6
        else:
            first = _day_number(match["first"])
            last = _day_number(match["last"]) if match["last"] else first
            if match["step"] and not match["last"]:
                last = 6
        if first > last:
            raise InvalidSchedule(f"cron {expr!r} has a backwards weekday range {part!r}")
        step = int(match["step"] or 1)
        days.update(d % 7 for d in range(first, last + 1, step))
    return ",".join(_DAYS[d] for d in sorted(days))


def _day_number(token: str) -> int:
    return int(token) if token.isdigit() else _DAYS.index(token)



MISSED_POLICIES = ("latest", "all", "none")
ON_TIME_MS = 60_000
"""A tick up to this late is on time and always fires; an older one was missed (every
worker was down or paused) and fires as the schedule's `missed` policy says."""
MAX_TICKS = 1000
"""Most ticks one schedule fires in one transaction (`missed="all"` after a long
outage): the rest fire at the next look, a second later."""


def plan_ticks(cron: Cron, next_fire: int, now: int, missed: str) -> tuple[list[int], int | None]:
    """The ticks to fire now, for a schedule whose next tick was `next_fire` (due:
    at most `now`), and its next tick after them.

    On-time ticks (at most `ON_TIME_MS` late) always fire. Missed ones: `all` fires
    each (up to `MAX_TICKS` at a time), `latest` fires the latest of them when no
    on-time tick fires, `none` fires none.
    """
    if missed == "all":
        ticks: list[int] = []
        tick: int | None = next_fire
        while tick is not None and tick <= now and len(ticks) < MAX_TICKS:
            ticks.append(tick)
            tick = cron.next_after(tick)
        return ticks, tick
    start = max(next_fire, now - ON_TIME_MS)
    on_time: list[int] = []
    tick = cron.next_after(start - 1)
    while tick is not None and tick <= now and len(on_time) < MAX_TICKS:
        on_time.append(tick)
        tick = cron.next_after(tick)
    if not on_time and missed == "latest" and next_fire < start:
        latest = cron.last_before(start, next_fire)
        if latest is not None:
            on_time.append(latest)
    return on_time, tick
