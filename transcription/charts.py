"""The admin dashboard's charts, drawn on the server as SVG (no script, nothing vendored).

Each function turns what the selectors read into plain shapes (rectangles, points, axis ticks)
with their numbers attached; ``admin/transcription/transcriptionjob/charts.html`` writes them out.
Every shape carries its numbers in ``data-`` attributes and a ``<title>`` (the tooltip), so the
page is readable by people and checkable by tests alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from tenants.selectors import DailyAudio
from transcription.selectors import LATENCY_PERCENTILES, DailyLatency

WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 36
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
# Tenants drawn one by one in the audio chart; the rest share one "other" band.
MAX_TENANT_SERIES = 8
OTHER_TENANTS = "other tenants"
PALETTE = ("#2f6fad", "#e07b39", "#3a9a5b", "#c94f4f", "#8466b8", "#8c6d4f", "#d36fae", "#7a7a7a", "#b5b83a")
OUTCOME_COLOURS = {"completed": "#3a9a5b", "failed": "#c94f4f", "running": "#2f6fad", "queued": "#e0a339"}
PERCENTILE_COLOURS = {50: "#2f6fad", 90: "#e07b39", 99: "#c94f4f"}


@dataclass
class Tick:
    y: float
    label: str


@dataclass
class DayLabel:
    x: float
    label: str


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    colour: str
    title: str
    data: dict[str, Any]


@dataclass
class Series:
    name: str
    colour: str
    points: list[Bar] = field(default_factory=list)  # x, y of each point (width/height unused)

    @property
    def polyline(self) -> str:
        return " ".join(f"{point.x:.1f},{point.y:.1f}" for point in self.points)


@dataclass
class Chart:
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    plot_right: int = WIDTH - RIGHT
    baseline: float = TOP + PLOT_H
    ticks: list[Tick] = field(default_factory=list)
    days: list[DayLabel] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    legend: list[tuple[str, str]] = field(default_factory=list)
    empty: bool = True


def _nice_ceiling(value: float) -> float:
    """The axis top: 1, 2, 2.5 or 5 times a power of ten, at least ``value``."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power


def _number(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


def _axis(top: float, unit: str) -> list[Tick]:
    return [Tick(y=TOP + PLOT_H - PLOT_H * i / 4, label=f"{_number(top * i / 4)} {unit}") for i in range(5)]


def _day_slots(days: list[date]) -> tuple[dict[date, float], float, list[DayLabel]]:
    slot = PLOT_W / len(days)
    x_of = {day: LEFT + index * slot for index, day in enumerate(days)}
    labels = [DayLabel(x=x_of[day] + slot / 2, label=day.strftime("%d %b")) for day in days[::5]]
    return x_of, slot, labels


def last_days(*, today: date, count: int) -> list[date]:
    return [today - timedelta(days=count - 1 - index) for index in range(count)]


def audio_minutes_chart(*, rows: list[DailyAudio], days: list[date]) -> Chart:
    """Stacked bars: audio minutes per UTC day, one band per tenant (the largest
    ``MAX_TENANT_SERIES``; the others together)."""
    totals: dict[str, int] = {}
    for row in rows:
        totals[row.tenant_slug] = totals.get(row.tenant_slug, 0) + row.audio_ms
    ranked = sorted(totals, key=lambda slug: (-totals[slug], slug))
    shown = ranked[:MAX_TENANT_SERIES]
    minutes: dict[tuple[date, str], float] = {}
    for row in rows:
        name = row.tenant_slug if row.tenant_slug in shown else OTHER_TENANTS
        minutes[(row.day, name)] = minutes.get((row.day, name), 0.0) + row.audio_ms / 60000
    names = shown + ([OTHER_TENANTS] if len(ranked) > len(shown) else [])
    colours = {name: PALETTE[index % len(PALETTE)] for index, name in enumerate(names)}
    per_day = {day: sum(minutes.get((day, name), 0.0) for name in names) for day in days}
    top = _nice_ceiling(max(per_day.values(), default=0.0))
    x_of, slot, labels = _day_slots(days)
    chart = Chart(ticks=_axis(top, "min"), days=labels, legend=[(name, colours[name]) for name in names])
    for day in days:
        stacked = 0.0
        for name in names:
            value = minutes.get((day, name), 0.0)
            if value <= 0:
                continue
            height = PLOT_H * value / top
            stacked += height
            chart.bars.append(
                Bar(
                    x=x_of[day] + slot * 0.15,
                    y=TOP + PLOT_H - stacked,
                    width=slot * 0.7,
                    height=height,
                    colour=colours[name],
                    title=f"{name}, {day.isoformat()}: {value:.2f} audio minutes",
                    data={"tenant": name, "day": day.isoformat(), "minutes": f"{value:.2f}"},
                )
            )
    chart.empty = not chart.bars
    return chart


def outcome_chart(*, counts: dict[str, int]) -> Chart:
    """One bar per job status: how the jobs of the period ended (or where they are now)."""
    order = [status for status in ("completed", "failed", "running", "queued") if status in counts]
    order += [status for status in counts if status not in order]
    top = _nice_ceiling(max(counts.values(), default=0))
    slot = PLOT_W / max(1, len(order))
    chart = Chart(ticks=_axis(top, ""), empty=not any(counts.values()))
    for index, status in enumerate(order):
        count = counts[status]
        height = PLOT_H * count / top
        x = LEFT + index * slot
        chart.days.append(DayLabel(x=x + slot / 2, label=f"{status} ({count})"))
        chart.bars.append(
            Bar(
                x=x + slot * 0.25,
                y=TOP + PLOT_H - height,
                width=slot * 0.5,
                height=height,
                colour=OUTCOME_COLOURS.get(status, PALETTE[-1]),
                title=f"{status}: {count} jobs",
                data={"outcome": status, "count": str(count)},
            )
        )
    return chart


def latency_chart(*, rows: list[DailyLatency], days: list[date]) -> Chart:
    """Lines of p50, p90 and p99 upload-to-result seconds per UTC day (days without completed
    jobs have no point)."""
    top = _nice_ceiling(max((row.seconds[p] for row in rows for p in LATENCY_PERCENTILES), default=0.0))
    x_of, slot, labels = _day_slots(days)
    chart = Chart(ticks=_axis(top, "s"), days=labels, empty=not rows)
    by_day = {row.day: row for row in rows}
    for percentile in LATENCY_PERCENTILES:
        name = f"p{percentile}"
        series = Series(name=name, colour=PERCENTILE_COLOURS[percentile])
        for day in days:
            row = by_day.get(day)
            if row is None:
                continue
            seconds = row.seconds[percentile]
            series.points.append(
                Bar(
                    x=x_of[day] + slot / 2,
                    y=TOP + PLOT_H - PLOT_H * seconds / top,
                    width=0,
                    height=0,
                    colour=series.colour,
                    title=f"{name} on {day.isoformat()}: {seconds:.2f} s ({row.jobs} jobs)",
                    data={"series": name, "day": day.isoformat(), "seconds": f"{seconds:.2f}", "jobs": str(row.jobs)},
                )
            )
        chart.series.append(series)
        chart.legend.append((name, series.colour))
    return chart
