"""The server-drawn SVG charts: scales, edge cases, escaping, accessibility markup."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from memberhub.console.charts import (
    HEIGHT,
    LEFT,
    TOP,
    WIDTH,
    ChartPoint,
    Scale,
    format_value,
    line_chart,
    value_ticks,
)

SVG = "{http://www.w3.org/2000/svg}"


def chart(
    points: list[ChartPoint],
    *,
    chart_id: str = "test-chart",
    title: str = "Liability",
    x_label: str = "Month end",
    y_label: str = "Points",
) -> str:
    return str(
        line_chart(points=points, chart_id=chart_id, title=title, x_label=x_label, y_label=y_label)
    )


def svg_of(html: str) -> ET.Element:
    match = re.search(r"<svg.*</svg>", html, re.S)
    assert match is not None
    return ET.fromstring(match.group(0))


def polyline_points(root: ET.Element) -> list[list[tuple[float, float]]]:
    return [
        [tuple(map(float, pair.split(","))) for pair in line.attrib["points"].split()]  # type: ignore[misc]
        for line in root.iter(f"{SVG}polyline")
    ]


def test_a_scale_maps_its_ends_to_the_pixel_range_upside_down_for_y() -> None:
    y = Scale(0, 100, 200, 10)
    assert (y(0), y(100), y(50)) == (200, 10, 105)


@pytest.mark.parametrize(
    ("values", "ticks"),
    [
        ([0, 1000], [0, 250, 500, 750, 1000]),
        ([3, 7], [0, 2, 4, 6, 8]),
        ([], [0, 0.25, 0.5, 0.75, 1]),
        ([0, 0], [0, 0.25, 0.5, 0.75, 1]),
        ([-40, 100], [-50, 0, 50, 100]),
        ([-5, -1], [-6, -4, -2, 0]),
        ([12_345], [0, 5000, 10_000, 15_000]),
    ],
)
def test_ticks_are_round_numbers_covering_the_values_and_zero(
    values: list[float], ticks: list[float]
) -> None:
    assert value_ticks(values) == ticks


@pytest.mark.parametrize(
    ("values", "ticks"),
    [
        ([0, 2], [0, 1, 2]),
        ([0, 1], [0, 1]),
        ([0, 9], [0, 5, 10]),
        ([0, 5000], [0, 2000, 4000, 6000]),
    ],
)
def test_ticks_of_counts_are_whole_numbers(values: list[float], ticks: list[float]) -> None:
    assert value_ticks(values, whole=True) == ticks


def test_a_chart_of_counts_has_whole_number_ticks() -> None:
    root = svg_of(
        str(
            line_chart(
                chart_id="counts",
                title="Users",
                x_label="Month",
                y_label="Members",
                points=[ChartPoint("a", 1), ChartPoint("b", 2)],
                whole_numbers=True,
            )
        )
    )
    ticks = [t.text for t in root.iter(f"{SVG}text") if t.attrib.get("text-anchor") == "end"]
    assert ticks == ["0", "1", "2"]


def test_values_are_written_with_separators_and_decimals_only_when_needed() -> None:
    assert (format_value(1234567), format_value(2.5), format_value(-3.0)) == (
        "1,234,567",
        "2.50",
        "-3",
    )


def test_the_line_passes_through_each_point_left_to_right_highest_value_highest() -> None:
    points = [ChartPoint("Jan", 100), ChartPoint("Feb", 300), ChartPoint("Mar", 200)]
    root = svg_of(chart(points))
    [line] = polyline_points(root)
    xs = [x for x, _ in line]
    ys = [y for _, y in line]
    assert xs == sorted(xs)
    assert xs[0] > LEFT
    assert xs[-1] < WIDTH
    # SVG's y grows downwards: the largest value has the smallest y.
    assert ys[1] < ys[2] < ys[0] < HEIGHT
    assert ys[1] >= TOP
    circles = list(root.iter(f"{SVG}circle"))
    assert [c.find(f"{SVG}title").text for c in circles] == ["Jan: 100", "Feb: 300", "Mar: 200"]  # type: ignore[union-attr]


def test_the_chart_is_an_image_named_by_its_title_and_described() -> None:
    html = chart([ChartPoint("Jan", 5), ChartPoint("Now", 8)])
    assert '<figcaption class="chart-caption">Liability</figcaption>' in html
    root = svg_of(html)
    assert root.attrib["role"] == "img"
    assert root.attrib["aria-labelledby"] == "test-chart-title test-chart-desc"
    assert root.find(f"{SVG}title").text == "Liability"  # type: ignore[union-attr]
    assert root.find(f"{SVG}desc").text == "Points went from 5 at Jan to 8 at Now."  # type: ignore[union-attr]
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "Month end" in texts
    assert "Points" in texts
    assert "style=" not in html


def test_the_table_holds_the_same_numbers() -> None:
    html = chart([ChartPoint("Jan", 1500), ChartPoint("Feb", None), ChartPoint("Now", 2.25)])
    rows = re.findall(r'<th scope="row">([^<]*)</th><td>([^<]*)</td>', html)
    assert rows == [("Jan", "1,500"), ("Feb", "—"), ("Now", "2.25")]
    assert '<th scope="col">Month end</th><th scope="col">Points</th>' in html


def test_an_empty_series_draws_axes_and_says_there_is_no_data() -> None:
    html = chart([])
    root = svg_of(html)
    assert polyline_points(root) == []
    assert "No data yet" in [t.text for t in root.iter(f"{SVG}text")]
    assert root.find(f"{SVG}desc").text == "No points figures yet."  # type: ignore[union-attr]


def test_a_single_point_is_drawn_in_the_middle() -> None:
    root = svg_of(chart([ChartPoint("Now", 42)]))
    [line] = polyline_points(root)
    [(x, _)] = line
    assert x == pytest.approx((LEFT + WIDTH - 16) / 2)
    assert root.find(f"{SVG}desc").text == "Points: 42 at Now."  # type: ignore[union-attr]


def test_missing_values_break_the_line() -> None:
    points = [ChartPoint(m, v) for m, v in [("a", 1), ("b", 2), ("c", None), ("d", 4)]]
    lines = polyline_points(svg_of(chart(points)))
    assert [len(line) for line in lines] == [2, 1]


def test_negative_and_zero_values_sit_on_either_side_of_the_zero_axis() -> None:
    root = svg_of(chart([ChartPoint("a", -50), ChartPoint("b", 0), ChartPoint("c", 50)]))
    [line] = polyline_points(root)
    zero_y = line[1][1]
    assert line[0][1] > zero_y > line[2][1]
    axes = [a for a in root.iter(f"{SVG}line") if a.attrib.get("class") == "chart-axis"]
    assert any(float(a.attrib["y1"]) == zero_y == float(a.attrib["y2"]) for a in axes)


def test_only_some_x_labels_show_when_there_are_many_but_the_last_always() -> None:
    points = [ChartPoint(f"m{i}", i) for i in range(24)]
    texts = [t.text for t in svg_of(chart(points)).iter(f"{SVG}text")]
    shown = [t for t in texts if t and t.startswith("m")]
    assert 2 <= len(shown) <= 6
    assert shown[-1] == "m23"


def test_labels_and_titles_are_escaped() -> None:
    evil = '<script>alert("x")</script>&'
    html = chart([ChartPoint(evil, 1), ChartPoint("b", 2)], title=evil, x_label=evil, y_label=evil)
    assert "<script>" not in html
    assert "&lt;script&gt;" in html
    svg_of(html)  # still well-formed XML


def test_a_chart_id_that_could_break_the_markup_is_refused() -> None:
    with pytest.raises(ValueError, match="chart_id"):
        chart([], chart_id='x" onload="y')
