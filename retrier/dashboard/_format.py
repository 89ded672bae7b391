"""How values look on the pages: times, ages, durations, stored JSON."""

from __future__ import annotations

import json
from typing import Any

from .._clock import ms_to_datetime


def when(ms: int | None) -> str:
    """An epoch-ms time as `YYYY-MM-DD HH:MM:SS` (UTC)."""
    return "" if ms is None else ms_to_datetime(ms).strftime("%Y-%m-%d %H:%M:%S")


def duration(ms: int | float | None) -> str:
    """A span of milliseconds, short: `850 ms`, `3.2 s`, `4 min 10 s`, `2 h 5 min`."""
    if ms is None:
        return ""
    ms = max(0, int(ms))
    if ms < 1000:
        return f"{ms} ms"
    s = ms / 1000
    if s < 60:
        return f"{s:.1f} s"
    minutes, sec = divmod(int(s), 60)
    if minutes < 60:
        return f"{minutes} min {sec} s" if sec else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours // 24} d {hours % 24} h"


def pretty_json(value: Any) -> str:
    """A stored value as indented JSON (a value that cannot be decoded, as it reads)."""
    try:
        return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def compact_json(value: Any) -> str:
    """A stored value as JSON on one line (a plain string: the page escapes it)."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def short(text: Any, width: int = 80) -> str:
    text = "" if text is None else str(text)
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= width else first[: width - 1] + "…"


def short_id(value: Any) -> str:
    """A run's or workflow's id as a page shows it: its last 12 hex digits. Ids begin
    with the time they were made (`retrier/_ids.py`), so their heads repeat across a
    burst of work; their tails are random. (A caller's own id, shorter, shows whole.)"""
    text = str(value)
    return text[-12:]


FILTERS = {
    "when": when,
    "duration": duration,
    "json": pretty_json,
    "compact": compact_json,
    "short": short,
    "short_id": short_id,
}
