"""Small charts as inline SVG, drawn on the server (no script, no library)."""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

from ._format import duration, when
from ._queries import Minute


def activity_chart(minutes: Sequence[Minute], width: int = 1100, height: int = 120) -> Markup:
    """The last hour, a bar per minute: runs that succeeded (up, green) and attempts
    that failed (down, red), each scaled to its own peak."""
    if not minutes:
        return Markup("")
    mid = height // 2
    step = width / len(minutes)
    top = max((m.succeeded for m in minutes), default=0) or 1
    bottom = max((m.failed for m in minutes), default=0) or 1
    bars: list[str] = []
    for i, m in enumerate(minutes):
        x = i * step
        label = escape(f"{when(m.start_ms)}: {m.succeeded} succeeded, {m.failed} failed")
        if m.succeeded:
            h = max(1.0, (mid - 4) * m.succeeded / top)
            bars.append(
                f'<rect class="ok" x="{x:.1f}" y="{mid - h:.1f}" width="{step - 1:.1f}" '
                f'height="{h:.1f}"><title>{label}</title></rect>'
            )
        if m.failed:
            h = max(1.0, (mid - 4) * m.failed / bottom)
            bars.append(
                f'<rect class="bad" x="{x:.1f}" y="{mid:.1f}" width="{step - 1:.1f}" '
                f'height="{h:.1f}"><title>{label}</title></rect>'
            )
    return Markup(
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="succeeded and failed per minute, last hour">'
        f'<line class="axis" x1="0" y1="{mid}" x2="{width}" y2="{mid}"/>'
        + "".join(bars)
        + f'<text x="2" y="12">succeeded/min (peak {top})</text>'
        f'<text x="2" y="{height - 3}">failed/min</text>'
        "</svg>"
    )


def timeline(spans: Sequence[tuple[str, int, int | None, str]], now_ms: int,
             width: int = 1100) -> Markup:
    """Horizontal bars, one per (label, start, end or None if still going, css class),
    on one time axis from the first start to the last end."""
    if not spans:
        return Markup("")
    start = min(s[1] for s in spans)
    end = max((s[2] if s[2] is not None else now_ms) for s in spans)
    total = max(end - start, 1)
    row, label_w = 22, 170
    scale = (width - label_w - 90) / total
    parts: list[str] = []
    for i, (label, s, e, css) in enumerate(spans):
        y = i * row
        x = label_w + (s - start) * scale
        w = max(2.0, ((e if e is not None else now_ms) - s) * scale)
        took = duration((e if e is not None else now_ms) - s) + ("" if e is not None else "…")
        parts.append(
            f'<text x="0" y="{y + 15}">{escape(label[:26])}</text>'
            f'<rect class="{escape(css)}" x="{x:.1f}" y="{y + 4}" width="{w:.1f}" height="14">'
            f"<title>{escape(label)}: {escape(took)}</title></rect>"
            f'<text x="{x + w + 4:.1f}" y="{y + 15}">{escape(took)}</text>'
        )
    height = row * len(spans) + 4
    return Markup(
        f'<svg class="timeline" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="timeline">' + "".join(parts) + "</svg>"
    )
