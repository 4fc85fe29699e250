"""Reading a bulk award upload: CSV with a header row, or a JSON document with `rows`.

Only the structure is checked here (a header, parseable CSV or JSON, known columns, one
object per row); the values of each row are checked when the worker applies it, so one bad
row fails that row rather than the upload. Rows are produced one at a time, as plain dicts
of the fields present, so a file of a million rows never exists as a million objects. The
upload arrives as a temporary file; CSV is read from it a block at a time and never held in
memory whole (JSON is: its reader works on the whole text).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Generator, Iterator
from typing import IO, Any

from memberhub.kit.errors import MemberhubError, ValidationFailed
from memberhub.kit.http import DuplicateKeys, unique_keys

MAX_ROWS = 1_000_000

COLUMNS = frozenset({"member_id", "email", "points", "reason", "reference_id", "expires_at"})
CSV_MEDIA_TYPE = "text/csv"
JSON_MEDIA_TYPE = "application/json"

_WHITESPACE = re.compile(r"[ \t\n\r]*")
READ_BYTES = 64 * 1024


class MalformedUpload(ValidationFailed):
    code = "MALFORMED_UPLOAD"
    default_message = "The upload could not be read."


class UploadTooLarge(MemberhubError):
    code = "UPLOAD_TOO_LARGE"
    status_code = 413
    default_message = f"A bulk award takes at most {MAX_ROWS:,} rows."


class UnsupportedMediaType(MemberhubError):
    code = "UNSUPPORTED_MEDIA_TYPE"
    status_code = 415
    default_message = f"Send the rows as {CSV_MEDIA_TYPE} or {JSON_MEDIA_TYPE}."


def report_text(value: Any, limit: int) -> str | None:
    """A row's value as it can be shown in the report and stored: NUL dropped, text with no
    UTF-8 form (a lone surrogate) replaced."""
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value)
    text = text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    return text[:limit]


def repeated_key(exc: DuplicateKeys, line: int) -> MalformedUpload:
    """A row naming a key twice: its second value (a second "points") would quietly win."""
    return _malformed(f"the key '{exc.keys[0][:50]}' is repeated in an object.", line)


def _malformed(message: str, line: int, **details: Any) -> MalformedUpload:
    return MalformedUpload(f"Line {line}: {message}", details={"line": line, **details})


def _check_columns(names: list[str], line: int) -> None:
    unknown = sorted(set(names) - COLUMNS)
    if unknown:
        raise _malformed(
            "unknown columns.", line, unknown_columns=unknown[:20], known_columns=sorted(COLUMNS)
        )


def check_utf8(file: IO[bytes]) -> None:
    """Refuse a file that is not UTF-8 text, naming the line of its first bad byte; read a
    block at a time, and left at its start."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines_before = 0
    file.seek(0)
    while True:
        block = file.read(READ_BYTES)
        try:
            decoder.decode(block, final=not block)
        except UnicodeDecodeError as exc:
            # `exc.object` is the block after what the decoder kept of the one before: the
            # start of a character, never a line break.
            line = lines_before + exc.object.count(b"\n", 0, exc.start) + 1
            raise _malformed("the upload is not UTF-8 text.", line) from exc
        if not block:
            break
        lines_before += block.count(b"\n")
    file.seek(0)


class Upload:
    """The rows of one upload, read lazily; `default_reason` is known once they are read."""

    def __init__(self) -> None:
        self.default_reason: str | None = None
        self.row_count = 0

    def rows(self) -> Iterator[dict[str, Any]]:
        for row in self._parse():
            self.row_count += 1
            if self.row_count > MAX_ROWS:
                raise UploadTooLarge(details={"max_rows": MAX_ROWS})
            yield row
        if self.row_count == 0:
            raise MalformedUpload("The upload has no rows.", code="NO_ROWS")

    def _parse(self) -> Iterator[dict[str, Any]]:
        raise NotImplementedError


class CsvUpload(Upload):
    """A header row naming the columns, then one award per line (blank lines are skipped).
    Lines end at "\n" only (a "\r" before it is the CSV reader's to take)."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__()
        self.file = file

    def _parse(self) -> Iterator[dict[str, Any]]:
        self.file.seek(0)
        text = io.TextIOWrapper(self.file, encoding="utf-8-sig", newline="\n")
        try:
            yield from self._parse_lines(text)
        finally:
            text.detach()  # the file is the caller's to close

    def _parse_lines(self, lines: Iterator[str]) -> Iterator[dict[str, Any]]:
        reader = csv.reader(lines, strict=True)
        try:
            header = next(reader, None)
            while header is not None and not any(header):
                header = next(reader, None)
            if header is None:
                raise MalformedUpload(
                    "The file is empty; it needs a header row, e.g. member_id,points,reason.",
                    details={"line": 1},
                )
            columns = self._name_columns(header)
            self._check_header(columns, reader.line_num)
            width = len(columns)
            for fields in reader:
                if not any(fields):
                    continue
                if len(fields) != width:
                    raise _malformed(
                        f"{len(fields)} fields where the header has {width}.",
                        reader.line_num,
                        fields=len(fields),
                        expected=width,
                    )
                yield {name: value for name, value in zip(columns, fields, strict=True) if value}
        except csv.Error as exc:
            raise _malformed(f"not valid CSV ({exc}).", reader.line_num) from exc

    def _name_columns(self, header: list[str]) -> list[str]:
        """The fields the header's columns fill."""
        return [name.strip().lower() for name in header]

    def _check_header(self, columns: list[str], line: int) -> None:
        _check_columns(columns, line)
        duplicated = sorted({name for name in columns if columns.count(name) > 1})
        if duplicated:
            raise _malformed("repeated columns.", line, repeated_columns=duplicated)
        if "points" not in columns or not {"member_id", "email"} & set(columns):
            raise _malformed(
                "the header needs a points column and a member_id or email column.",
                line,
                columns=columns[:20],
            )


class JsonUpload(Upload):
    """`{"reason": "...", "rows": [{...}, ...]}`, read one row object at a time."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self._decoder = json.JSONDecoder(object_pairs_hook=unique_keys)

    def _line(self, position: int) -> int:
        return self.text.count("\n", 0, position) + 1

    def _skip(self, position: int) -> int:
        match = _WHITESPACE.match(self.text, position)
        assert match is not None
        return match.end()

    def _expect(self, position: int, token: str, what: str) -> int:
        if not self.text.startswith(token, position):
            raise _malformed(f"expected {what}.", self._line(position))
        return self._skip(position + len(token))

    def _value(self, position: int) -> tuple[Any, int]:
        try:
            value, end = self._decoder.raw_decode(self.text, position)
        except json.JSONDecodeError as exc:
            raise _malformed(f"not valid JSON ({exc.msg}).", exc.lineno) from exc
        except DuplicateKeys as exc:
            raise repeated_key(exc, self._line(position)) from None
        except (ValueError, RecursionError) as exc:
            # Integers past Python's digit limit, or nesting deeper than the parser goes.
            raise _malformed("a value cannot be read.", self._line(position)) from exc
        return value, self._skip(end)

    def _parse(self) -> Iterator[dict[str, Any]]:
        position = self._expect(self._skip(0), "{", 'a JSON object like {"rows": [...]}')
        seen: set[str] = set()
        while not self.text.startswith("}", position):
            if seen:
                position = self._expect(position, ",", "',' or '}' after a field")
            if not self.text.startswith('"', position):
                raise _malformed("expected a field name.", self._line(position))
            key, position = self._value(position)
            if key in seen:
                raise _malformed(f"the field '{key}' is repeated.", self._line(position))
            seen.add(key)
            position = self._expect(position, ":", "':' after a field name")
            if key == "rows":
                position = yield from self._rows(position)
            elif key == "reason":
                reason, end = self._value(position)
                if reason is not None and not isinstance(reason, str):
                    raise _malformed("reason must be a string.", self._line(position))
                self.default_reason, position = reason, end
            else:
                raise _malformed(
                    f"unknown field '{str(key)[:50]}'; the fields are reason and rows.",
                    self._line(position),
                )
        if "rows" not in seen:
            raise MalformedUpload("The JSON object needs a rows array.", details={"line": 1})
        if self._skip(position + 1) != len(self.text):
            raise _malformed("unexpected data after the JSON object.", self._line(position + 1))

    def _rows(self, position: int) -> Generator[dict[str, Any], None, int]:
        """Yield the row objects of the array at `position`; returns the position after it."""
        position = self._expect(position, "[", "rows to be an array")
        first = True
        while not self.text.startswith("]", position):
            if not first:
                position = self._expect(position, ",", "',' or ']' after a row")
            first = False
            start = position
            row, position = self._value(position)
            if not isinstance(row, dict):
                raise _malformed(
                    f"row {self.row_count + 1} is not an object.",
                    self._line(start),
                    row=self.row_count + 1,
                )
            if not row.keys() <= COLUMNS:
                _check_columns(list(row), self._line(start))
            if any(isinstance(value, dict | list) for value in row.values()):
                raise _malformed(
                    f"row {self.row_count + 1} has a nested value; give text or numbers.",
                    self._line(start),
                    row=self.row_count + 1,
                )
            yield {name: value for name, value in row.items() if value is not None}
        return self._skip(position + 1)


def open_upload(media_type: str, file: IO[bytes]) -> Upload:
    """The upload in `file`, which stays open (and is read) while its rows are."""
    kind = media_type.split(";", 1)[0].strip().lower()
    if kind not in (CSV_MEDIA_TYPE, JSON_MEDIA_TYPE):
        raise UnsupportedMediaType(details={"content_type": kind[:100] or None})
    check_utf8(file)
    if kind == CSV_MEDIA_TYPE:
        return CsvUpload(file)
    # The JSON reader works on the whole text (within the upload's byte limit).
    return JsonUpload(file.read().decode("utf-8-sig"))
