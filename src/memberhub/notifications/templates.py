"""Templates: Jinja2 in its immutable sandbox, checked when saved, rendered per recipient.

A template reads only the variables it is given (`catalog.variables`); the sandbox
refuses attribute access to anything private or unsafe (`__class__`, `mro`, a function's
globals, …) and mutation of what it is given. An undefined variable is an error, not an
empty string: a typo is refused at save time, when the template is rendered against the
message type's sample data, rather than sent as a blank to every member.

HTML email bodies are autoescaped; their plain-text part is made from the rendered HTML.
What a template may build is bounded: a string or list multiplied or added past the
rendered limit, a huge power, or output past the limit is refused as it is made, not after
the memory is spent.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from html.parser import HTMLParser
from types import TracebackType
from typing import Any

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

MAX_RENDERED_CHARS = 200_000
MAX_EXPONENT = 1_000

# The recipient's time zone while a template renders: the `date` filter shows times in it.
_zone: ContextVar[tzinfo] = ContextVar("template_zone", default=UTC)


def _date(value: Any, format: str | None = None) -> str:
    """An ISO 8601 time (as the event data has it) or a datetime, formatted in the
    recipient's time zone: by default as "5 January 2027", else by the strftime `format`
    given, as written. A plain date (`2027-01-05`) is shown as it is."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
        value = parsed if "T" in value or " " in value.strip() else parsed.date()
    if isinstance(value, datetime) and value.tzinfo is not None:
        value = value.astimezone(_zone.get())
    if hasattr(value, "strftime"):
        if format is None:
            return f"{value.day} {value:%B %Y}"
        return value.strftime(format)
    return "" if value is None else str(value)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with the operators that can build a huge value bounded."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, int) and abs(right) > MAX_EXPONENT and left not in (0, 1, -1):
                raise SecurityError(f"a power above {MAX_EXPONENT}")
        elif operator == "*":
            for sequence, times in ((left, right), (right, left)):
                if (
                    isinstance(sequence, str | list | tuple)
                    and isinstance(times, int)
                    and len(sequence) * times > MAX_RENDERED_CHARS
                ):
                    raise SecurityError(f"a value longer than {MAX_RENDERED_CHARS}")
        elif (
            operator == "+"
            and isinstance(left, str | list | tuple)
            and isinstance(right, str | list | tuple)
            and len(left) + len(right) > MAX_RENDERED_CHARS
        ):
            raise SecurityError(f"a value longer than {MAX_RENDERED_CHARS}")
        return super().call_binop(context, operator, left, right)


def _environment(*, autoescape: bool) -> ImmutableSandboxedEnvironment:
    environment = _Sandbox(
        undefined=StrictUndefined, autoescape=autoescape, keep_trailing_newline=False
    )
    environment.filters["date"] = _date
    return environment


_TEXT = _environment(autoescape=False)
_HTML = _environment(autoescape=True)


class TemplateInvalid(Exception):
    """A template that does not parse or does not render: which part, the line, the reason."""

    def __init__(self, part: str, line: int | None, reason: str) -> None:
        where = f"{part}, line {line}" if line is not None else part
        super().__init__(f"{where}: {reason}")
        self.part = part
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class Rendered:
    subject: str | None
    text: str
    html: str | None


def render(
    *,
    subject: str | None,
    body: str,
    format: str,
    context: Mapping[str, Any],
    zone: tzinfo = UTC,
) -> Rendered:
    """Render a template's parts, times shown in `zone` (the recipient's); TemplateInvalid
    says which part failed, where and why."""
    token = _zone.set(zone)
    try:
        return _render_parts(subject=subject, body=body, format=format, context=context)
    finally:
        _zone.reset(token)


def _render_parts(
    *, subject: str | None, body: str, format: str, context: Mapping[str, Any]
) -> Rendered:
    rendered_subject = (
        " ".join(_render(_TEXT, "subject", subject, context).split())
        if subject is not None
        else None
    )
    if format == "html":
        markup = _render(_HTML, "body", body, context)
        return Rendered(subject=rendered_subject, text=html_to_text(markup), html=markup)
    return Rendered(
        subject=rendered_subject, text=_render(_TEXT, "body", body, context).strip(), html=None
    )


def _render(
    environment: ImmutableSandboxedEnvironment, part: str, source: str, context: Mapping[str, Any]
) -> str:
    try:
        template = environment.from_string(source)
    except TemplateSyntaxError as exc:
        raise TemplateInvalid(part, exc.lineno, exc.message or "syntax error") from None
    chunks: list[str] = []
    length = 0
    try:
        for chunk in template.generate(dict(context)):
            length += len(chunk)
            if length > MAX_RENDERED_CHARS:
                raise TemplateInvalid(
                    part, None, f"renders more than {MAX_RENDERED_CHARS} characters"
                )
            chunks.append(chunk)
    except SecurityError as exc:
        raise TemplateInvalid(part, _template_line(), f"not allowed: {exc}") from None
    except TemplateError as exc:
        raise TemplateInvalid(part, _template_line(), exc.message or str(exc)) from None
    except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError) as exc:
        raise TemplateInvalid(part, _template_line(), f"{type(exc).__name__}: {exc}") from None
    except MemoryError:
        raise TemplateInvalid(part, _template_line(), "needs too much memory") from None
    return "".join(chunks)


def _template_line() -> int | None:
    """The template line of the error being handled: Jinja rewrites the traceback so that
    its last template frame carries the template's own line number."""
    traceback: TracebackType | None = sys.exc_info()[2]
    line = None
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename == "<template>":
            line = traceback.tb_lineno
        traceback = traceback.tb_next
    return line


class _TextFromHtml(HTMLParser):
    _BLOCKS = frozenset(
        {
            "p", "div", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "li", "table", "hr",
            "ul", "ol", "dl", "dt", "dd", "blockquote", "pre", "section", "article",
            "header", "footer", "main", "nav", "aside", "figure", "figcaption", "address",
            "tbody", "thead", "tfoot", "center",
        }
    )  # fmt: skip
    _CELLS = frozenset({"td", "th"})
    _SKIP = frozenset({"style", "script", "head", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0
        self._links: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag == "br":
            self.parts.append("\n")
        elif tag in self._BLOCKS:
            self.parts.append("\n")
            if tag == "li":
                self.parts.append("- ")
        elif tag in self._CELLS:
            self.parts.append(" ")  # cells of a row stay apart, on one line
        elif tag == "a":
            self._links.append(dict(attrs).get("href"))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # `<br/>` is one line break, not the two a start and an end tag would make.
        self.handle_starttag(tag, attrs)
        if tag not in ("br", "hr"):
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self._BLOCKS:
            self.parts.append("\n")
        elif tag == "a" and self._links:
            href = self._links.pop()
            if href and not href.startswith("#"):
                self.parts.append(f" ({href})")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """The plain-text part of an HTML email: its text, paragraphs kept, links spelled out."""
    parser = _TextFromHtml()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.parts)
    # The parser decoded the character references once already (convert_charrefs).
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
