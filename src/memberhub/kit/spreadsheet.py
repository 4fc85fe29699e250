"""Cells of the CSV files people open in a spreadsheet (reports, lead exports).

A spreadsheet runs a cell that starts with `=`, `+`, `-` or `@` as a formula
(`=HYPERLINK(...)` sends the reader's data away), and it trims leading spaces and line
breaks before it looks: `"  =HYPERLINK(...)"` is a formula too. A tab or carriage return
at the start splits or hides a cell in some of them. Such a cell is written with a `'`
before it, which a spreadsheet shows as text and does not display. Every CSV meant for
people goes through `csv_cell`; the warehouse exports (`exports/`) hold values as stored.
"""

from __future__ import annotations

FORMULA_STARTS = ("=", "+", "-", "@")
_HIDING_STARTS = ("\t", "\r")


def csv_cell(value: str | None) -> str:
    """Text as a spreadsheet shows it, never as a formula to run."""
    if value is None:
        return ""
    if value.startswith(_HIDING_STARTS) or value.lstrip().startswith(FORMULA_STARTS):
        return "'" + value
    return value
