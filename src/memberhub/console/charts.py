"""Charts for console pages, drawn on the server as inline SVG: no script, and nothing the
page's CSP refuses (colours and line widths come from classes in console.css, never from
`style` attributes).

A chart is a `<figure>` holding an `<svg role="img">` named by its `<title>` and described
by a `<desc>`, and a table of the same numbers for those who cannot see the drawing. Every
piece of text is escaped: labels may come from data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH = 640
HEIGHT = 260
# Room for the y axis's tick labels and title on the left, the x labels below.
LEFT, RIGHT, TOP, BOTTOM = 72, 16, 16, 48
MAX_X_LABELS = 6
TICKS = 4


@dataclass(frozen=True)
class ChartPoint:
    label: str
    value: float | None  # None: no figure for this point (a gap in the line)


@dataclass(frozen=True)
class Scale:
    """A linear map from values in [low, high] to pixels in [start, end]."""

    low: float
    high: float
    start: float
    end: float

    def __call__(self, value: float) -> float:
        return self.start + (value - self.low) * (self.end - self.start) / (self.high - self.low)


def _nice_step(span: float, count: int, *, whole: bool) -> float:
    """The smallest of 1, 2, 2.5 or 5 times a power of ten that covers `span` in `count`
    (at least 1, and never 2.5, for `whole` numbers)."""
    raw = max(span / count, 1.0) if whole else span / count
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in (1.0, 2.0, 2.5, 5.0, 10.0):
        if whole and not float(factor * power).is_integer():
            continue
        if factor * power >= raw:
            return factor * power
    return 10.0 * power  # pragma: no cover - the loop always returns


def value_ticks(values: Sequence[float], count: int = TICKS, *, whole: bool = False) -> list[float]:
    """Evenly spaced round values covering `values` and zero (a line at zero is a baseline
    worth seeing), lowest first; whole numbers only for counts (`whole`)."""
    low = min([0.0, *values])
    high = max([0.0, *values])
    if high == low:
        high = low + 1.0
    step = _nice_step(high - low, count, whole=whole)
    first = math.floor(low / step)
    last = math.ceil(high / step)
    return [round(i * step, 10) for i in range(first, last + 1)]


def format_value(value: float) -> str:
    """Whole numbers with thousands separators; others with two decimals."""
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.2f}"


def _label_positions(count: int) -> set[int]:
    """Which x labels to print so that at most MAX_X_LABELS show; the last always does."""
    if count <= MAX_X_LABELS:
        return set(range(count))
    every = math.ceil(count / MAX_X_LABELS)
    return {i for i in range(count) if (count - 1 - i) % every == 0}


def _number(value: float) -> str:
    return f"{value:.1f}"


def line_chart(
    *,
    chart_id: str,
    title: str,
    x_label: str,
    y_label: str,
    points: Sequence[ChartPoint],
    formatter: Callable[[float], str] = format_value,
    whole_numbers: bool = False,
) -> Markup:
    """A line chart of `points` in order, with its table. `chart_id` makes the ids of the
    title and description unique on the page (letters, digits and dashes only);
    `whole_numbers` keeps the axis's ticks to integers (for counts)."""
    if not chart_id.replace("-", "").isalnum():
        raise ValueError("chart_id takes letters, digits and dashes only")
    known = [p.value for p in points if p.value is not None]
    title_id, desc_id = f"{chart_id}-title", f"{chart_id}-desc"
    parts = [
        f'<figure class="chart" id="{chart_id}">',
        f'<figcaption class="chart-caption">{escape(title)}</figcaption>',
        f'<svg class="chart-svg" role="img" aria-labelledby="{title_id} {desc_id}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        'preserveAspectRatio="xMidYMid meet" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{title_id}">{escape(title)}</title>',
        f'<desc id="{desc_id}">{escape(_describe(points, y_label, formatter))}</desc>',
    ]
    plot_bottom = HEIGHT - BOTTOM
    ticks = value_ticks(known, whole=whole_numbers)
    y = Scale(ticks[0], ticks[-1], plot_bottom, TOP)
    x = Scale(-0.5, len(points) - 0.5, LEFT, WIDTH - RIGHT) if points else None
    parts.append('<g class="chart-grid">')
    for tick in ticks:
        at = _number(y(tick))
        parts.append(
            f'<line class="chart-gridline" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{at}" y2="{at}"/>'
            f'<text class="chart-tick" x="{LEFT - 6}" y="{at}" text-anchor="end" '
            f'dominant-baseline="middle">{escape(formatter(tick))}</text>'
        )
    parts.append("</g>")
    parts.append(
        f'<line class="chart-axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{plot_bottom}"/>'
        f'<line class="chart-axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" '
        f'y1="{_number(y(0.0))}" y2="{_number(y(0.0))}"/>'
    )
    if x is not None:
        shown = _label_positions(len(points))
        for index, point in enumerate(points):
            if index in shown:
                parts.append(
                    f'<text class="chart-tick" x="{_number(x(index))}" y="{plot_bottom + 18}" '
                    f'text-anchor="middle">{escape(point.label)}</text>'
                )
        for segment in _segments(points):
            coords = " ".join(f"{_number(x(i))},{_number(y(value))}" for i, value in segment)
            parts.append(f'<polyline class="chart-line" fill="none" points="{coords}"/>')
        for index, point in enumerate(points):
            if point.value is not None:
                parts.append(
                    f'<circle class="chart-point" cx="{_number(x(index))}" '
                    f'cy="{_number(y(point.value))}" r="3.5">'
                    f"<title>{escape(point.label)}: {escape(formatter(point.value))}</title>"
                    "</circle>"
                )
    else:
        parts.append(
            f'<text class="chart-empty" x="{WIDTH // 2}" y="{HEIGHT // 2}" '
            'text-anchor="middle">No data yet</text>'
        )
    parts.append(
        f'<text class="chart-axis-title" x="{(LEFT + WIDTH - RIGHT) // 2}" y="{HEIGHT - 6}" '
        f'text-anchor="middle">{escape(x_label)}</text>'
        f'<text class="chart-axis-title" x="14" y="{(TOP + plot_bottom) // 2}" '
        f'text-anchor="middle" transform="rotate(-90 14 {(TOP + plot_bottom) // 2})">'
        f"{escape(y_label)}</text>"
    )
    parts.append("</svg>")
    parts.append(_table(chart_id, title, x_label, y_label, points, formatter))
    parts.append("</figure>")
    return Markup("".join(parts))


def _segments(points: Sequence[ChartPoint]) -> list[list[tuple[int, float]]]:
    """Runs of consecutive known values: the line breaks where a value is missing."""
    segments: list[list[tuple[int, float]]] = [[]]
    for index, point in enumerate(points):
        if point.value is None:
            if segments[-1]:
                segments.append([])
        else:
            segments[-1].append((index, point.value))
    return [s for s in segments if s]


def _describe(points: Sequence[ChartPoint], y_label: str, formatter: Callable[[float], str]) -> str:
    known = [(p.label, p.value) for p in points if p.value is not None]
    if not known:
        return f"No {y_label.lower()} figures yet."
    (first_label, first), (last_label, last) = known[0], known[-1]
    if len(known) == 1:
        return f"{y_label}: {formatter(first)} at {first_label}."
    return (
        f"{y_label} went from {formatter(first)} at {first_label} "
        f"to {formatter(last)} at {last_label}."
    )


def _table(
    chart_id: str,
    title: str,
    x_label: str,
    y_label: str,
    points: Sequence[ChartPoint],
    formatter: Callable[[float], str],
) -> str:
    rows = "".join(
        f'<tr><th scope="row">{escape(p.label)}</th>'
        f"<td>{escape(formatter(p.value)) if p.value is not None else '—'}</td></tr>"
        for p in points
    )
    return (
        f'<details class="chart-data"><summary>{escape(title)}: the numbers</summary>'
        f'<div class="table-wrap"><table id="{chart_id}-table">'
        f"<caption>{escape(title)}</caption>"
        f'<thead><tr><th scope="col">{escape(x_label)}</th>'
        f'<th scope="col">{escape(y_label)}</th></tr></thead>'
        f"<tbody>{rows}</tbody></table></div></details>"
    )
