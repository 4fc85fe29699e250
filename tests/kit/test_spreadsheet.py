"""CSV cells for people: never a formula a spreadsheet would run."""

from __future__ import annotations

import pytest

from memberhub.kit.spreadsheet import csv_cell


@pytest.mark.parametrize(
    "value",
    [
        '=HYPERLINK("http://x")',
        "+1+1",
        "-1+1",
        "@SUM(1)",
        "\tabc",
        "\rabc",
        # A spreadsheet trims leading spaces and line breaks before it looks.
        '  =HYPERLINK("http://x")',
        " +1+1",
        "\n-1+1",
        "\u00a0@SUM(1)",
        " \t=1",
    ],
)
def test_a_cell_a_spreadsheet_would_run_is_written_as_text(value: str) -> None:
    assert csv_cell(value) == "'" + value


@pytest.mark.parametrize("value", ["Alex", "  Alex", "a=b", "mem_1", "", "'=already"])
def test_other_text_is_written_as_it_is(value: str) -> None:
    assert csv_cell(value) == value


def test_nothing_is_an_empty_cell() -> None:
    assert csv_cell(None) == ""
