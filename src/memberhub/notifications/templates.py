"""Templates: Jinja2 in its immutable sandbox, checked when saved, rendered per recipient.

A template reads only the variables it is given (`catalog.variables`); the sandbox
refuses attribute access to anything private or unsafe (`__class__`, `mro`, a function's
globals, …) and mutation of what it is given. An undefined variable is an error, not an
empty string: a typo is refused at save time, when the template is rendered against the
message type's sample data, rather than sent as a blank to every member.

HTML email bodies are autoescaped; their plain-text part is made from the rendered HTML.
What a template may build is bounded (`_Sandbox`): a value past the rendered limit is
refused as it is made (a string or list repeated or joined, a power, a width, a
replacement), not after the memory is spent, and any other error a template meets (a
filter given what it cannot take) is the template's, reported with its line.

What a template may do is bounded too, not only what it builds: a render has a budget of
MAX_RENDER_STEPS steps, counted by the sandbox itself as the template runs (no thread or
signal stops it from outside). Every pass through a block (the template, a loop's body,
a branch, a macro) costs the block's size in nodes, every item a loop draws costs one, and
every call, filter, test, operator, slice or `in` costs one plus the length of the
strings and collections it is given or makes (their work is done in C, but grows with
them), and a macro call 25 more. Nested loops that print nothing (`range(100000)` within
`range(100000)`) or a macro calling itself twice run out of steps within a fraction of a
second, and are refused like any other error: at save or preview time, and, should one
get past, by failing that member's notification alone.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from html.parser import HTMLParser
from types import TracebackType
from typing import Any

from jinja2 import Environment, StrictUndefined, TemplateError, TemplateSyntaxError, nodes
from jinja2.compiler import CodeGenerator, Frame, operators
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import generate_lorem_ipsum

MAX_RENDERED_CHARS = 200_000
MAX_EXPONENT = 1_000
MAX_RENDER_STEPS = 500_000
# A macro call is some twenty times the work of a filter call in Jinja's runtime.
_MACRO_CALL_STEPS = 25

# The recipient's time zone while a template renders: the `date` filter shows times in it.
_zone: ContextVar[tzinfo] = ContextVar("template_zone", default=UTC)


class _Steps:
    """The steps one render has taken (see the module docstring)."""

    __slots__ = ("taken",)

    def __init__(self) -> None:
        self.taken = 0


class TooMuchWork(SecurityError):
    """A render that took more than MAX_RENDER_STEPS steps."""


# The steps of the render under way, set by `render` (the only way a template is run).
_steps: ContextVar[_Steps] = ContextVar("template_steps")


def _charge(steps: int) -> None:
    counter = _steps.get()
    counter.taken += steps
    if counter.taken > MAX_RENDER_STEPS:
        raise TooMuchWork(f"more than {MAX_RENDER_STEPS} steps")


def _length(value: Any) -> int:
    """How much C-level work `value` stands for: the length of a string or collection."""
    if isinstance(value, str | bytes | list | tuple | dict | set | frozenset | range):
        return len(value)
    return 0


def _charge_for(*values: Any) -> None:
    _charge(1 + sum(_length(value) for value in values))


def _charged(made: Any) -> Any:
    """What a call or an operator made, charged its length (making it took as long)."""
    _charge(_length(made))
    return made


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


# An integer with more bits than this has more digits than a template may render.
MAX_VALUE_BITS = MAX_RENDERED_CHARS * 4
# A width in a format ("%-9999999s", "{:>9999999}") past what a template may render.
_HUGE_WIDTH = re.compile(r"\d{7,}")
# Methods and filters whose output grows with a number they are given.
_WIDTH_METHODS = frozenset({"ljust", "rjust", "center", "zfill", "expandtabs"})
_WIDTH_FILTERS = frozenset({"center", "indent", "format"})
_DEEPEST = 50


def _too_long() -> SecurityError:
    return SecurityError(f"a value longer than {MAX_RENDERED_CHARS} characters")


def _size(value: Any, depth: int = 0) -> int:
    """About how many characters `value` takes when shown: a string its length, an integer
    its digits, a list or mapping its items each time they appear (a list of one long
    string repeated is as long as all of them)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, bool) or value is None:
        return 5
    if isinstance(value, int):
        return value.bit_length() * 3 // 10 + 1
    if isinstance(value, list | tuple | set | frozenset | dict):
        if depth > _DEEPEST:
            return MAX_RENDERED_CHARS + 1
        items = (
            (item for pair in value.items() for item in pair)
            if isinstance(value, dict)
            else iter(value)
        )
        total = 2 * len(value)
        for item in items:
            total += _size(item, depth + 1)
            if total > MAX_RENDERED_CHARS:
                return total
        return total
    return 16


def _bounded(value: Any) -> Any:
    if _size(value) > MAX_RENDERED_CHARS:
        raise _too_long()
    return value


def _no_huge_number(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > MAX_RENDERED_CHARS:
            raise _too_long()


def _check_format(text: str, args: Any) -> None:
    """A %-format or str.format string whose widths would build a huge value."""
    if _HUGE_WIDTH.search(text):
        raise _too_long()
    if "*" in text or "{" in text:  # widths taken from the arguments
        values = args if isinstance(args, tuple) else (args,)
        _no_huge_number(values, args if isinstance(args, dict) else {})


def _check_growth(name: str, target: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Refuse, before it is built, what a string method or filter named `name` would make
    past the limit from a value that is itself within it."""
    if name in _WIDTH_METHODS or name in _WIDTH_FILTERS:
        _no_huge_number(args, kwargs)
    if not isinstance(target, str):
        if name == "join" and isinstance(target, list | tuple):
            _bounded(target)
        return
    if name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        if isinstance(width, int) and (target.count("\n") + 1) * width > MAX_RENDERED_CHARS:
            raise _too_long()
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int) and target.count("\t") * size > MAX_RENDERED_CHARS:
            raise _too_long()
    elif name == "replace" and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        times = target.count(old) if old else len(target) + 1
        if len(target) + times * (len(new) - len(old)) > MAX_RENDERED_CHARS:
            raise _too_long()
    elif name == "join" and args:
        parts = args[0]
        if isinstance(parts, list | tuple):
            _bounded(parts)
            if len(target) * len(parts) > MAX_RENDERED_CHARS:
                raise _too_long()
    elif name == "format":
        _check_format(target, args or kwargs)


class _Generator(CodeGenerator):
    """Jinja's code generator, but `a ~ b` joins through the environment (bounded), and
    the compiled template charges its steps (see the module docstring): each block as it
    is entered, each item a loop draws, each comparison its right-hand operand's length."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loop_iterables: set[int] = set()

    def blockvisit(self, nodes_: Any, frame: Frame) -> None:
        body = list(nodes_)
        size = sum(1 for node in body for _ in node.find_all(nodes.Node)) + len(body)
        self.writeline(f"environment.charge({max(size, 1)})")
        super().blockvisit(body, frame)

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        # Jinja allows no node types of our own: the iterable is marked instead.
        self._loop_iterables.add(id(node.iter))
        super().visit_For(node, frame)

    def visit(self, node: nodes.Node, *args: Any, **kwargs: Any) -> Any:
        if id(node) not in self._loop_iterables:
            return super().visit(node, *args, **kwargs)
        self.write("environment.counted(")
        super().visit(node, *args, **kwargs)
        self.write(")")
        return None

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            join = "markup_join"
        else:
            join = "str_join"
        self.write(f"environment.bounded_join({join}, (")
        for argument in node.nodes:
            self.visit(argument, frame)
            self.write(", ")
        self.write("))")

    def visit_Operand(self, node: nodes.Operand, frame: Frame) -> None:
        # `x in items`, `items == others`, `a < b`: as much work as the right-hand
        # operand is long (a comparison stops at the shorter side).
        self.write(f" {operators[node.op]} environment.charged(")
        self.visit(node.expr, frame)
        self.write(")")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, in which nothing a template builds grows past
    MAX_RENDERED_CHARS: what would (a string repeated, a power, a width, a replacement, a
    join) is refused before it is made, and every value an operator, a call, a filter or
    `~` makes, and every value output, is measured."""

    code_generator_class = _Generator
    # Every operator, so that each is charged its steps (a set difference is a loop too).
    intercepted_binops = frozenset({"*", "**", "+", "%", "-", "/", "//"})

    def __init__(self, **options: Any) -> None:
        super().__init__(finalize=_bounded, **options)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.tests = {name: _charged_test(test) for name, test in self.tests.items()}
        self.globals["lipsum"] = _bounded_lipsum

    # What the compiled template calls to count its steps (see _Generator).
    def charge(self, steps: int) -> None:
        _charge(steps)

    def charged(self, value: Any) -> Any:
        _charge_for(value)
        return value

    def counted(self, iterable: Any) -> Iterator[Any]:
        for item in iterable:
            _charge(1)
            yield item

    def getitem(self, obj: Any, argument: Any) -> Any:
        _charge(1 + (_length(obj) if isinstance(argument, slice) else 0))
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _charge_for(left, right)
        numbers = all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right))
        if operator == "**":
            if isinstance(right, int) and abs(right) > MAX_EXPONENT and left not in (0, 1, -1):
                raise SecurityError(f"a power above {MAX_EXPONENT}")
            if numbers and right > 0 and abs(left).bit_length() * right > MAX_VALUE_BITS:
                raise _too_long()
        elif operator == "*":
            if numbers and left.bit_length() + right.bit_length() > MAX_VALUE_BITS:
                raise _too_long()
            for sequence, times in ((left, right), (right, left)):
                if (
                    isinstance(sequence, str | list | tuple)
                    and isinstance(times, int)
                    and _size(sequence) * times > MAX_RENDERED_CHARS
                ):
                    raise _too_long()
        elif operator == "+":
            if _size(left) + _size(right) > MAX_RENDERED_CHARS:
                raise _too_long()
        elif operator == "%" and isinstance(left, str):
            _check_format(left, right)
        return _charged(_bounded(super().call_binop(context, operator, left, right)))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        target = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "")
        if isinstance(target, str | list | tuple):
            _check_growth(name, target, args, kwargs)
        _charge_for(target, *args, *kwargs.values())
        if isinstance(__obj, Macro):
            _charge(_MACRO_CALL_STEPS)
        return _charged(_bounded(super().call(__context, __obj, *args, **kwargs)))

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        text = value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format(text, args or kwargs)
            _charge_for(text, *args, *kwargs.values())
            return str(_charged(_bounded(wrapped(*args, **kwargs))))

        return checked

    def bounded_join(self, join: Any, parts: tuple[Any, ...]) -> Any:
        if sum(_size(part) for part in parts) > MAX_RENDERED_CHARS:
            raise _too_long()
        _charge_for(*parts)
        return join(parts)


def _bounded_filter(name: str, filter_: Any) -> Any:
    """`filter_`, refusing what it would build past the limit (before, where its arguments
    say so; after, measured)."""

    @functools.wraps(filter_)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        # The filtered value is the first argument after the context or environment a
        # filter may take.
        values = [a for a in args if not isinstance(a, Context | Environment | EvalContext)]
        if values:
            _check_growth(name, values[0], tuple(values[1:]), kwargs)
        _charge_for(*values, *kwargs.values())
        return _charged(_bounded(filter_(*args, **kwargs)))

    return bounded


def _charged_test(test: Any) -> Any:
    """`test`, charged its steps (`x is in items` is as long as the items)."""

    @functools.wraps(test)
    def charged(*args: Any, **kwargs: Any) -> Any:
        _charge_for(*args, *kwargs.values())
        return test(*args, **kwargs)

    return charged


def _bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> Any:
    """Jinja's `lipsum`, charged a step per word it may write before it writes them."""
    _charge(1 + n * max)
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def _environment(*, autoescape: bool) -> ImmutableSandboxedEnvironment:
    environment = _Sandbox(
        undefined=StrictUndefined, autoescape=autoescape, keep_trailing_newline=False
    )
    environment.filters["date"] = _bounded_filter("date", _date)
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
    zone_token = _zone.set(zone)
    steps_token = _steps.set(_Steps())
    try:
        return _render_parts(subject=subject, body=body, format=format, context=context)
    finally:
        _steps.reset(steps_token)
        _zone.reset(zone_token)


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
    except TemplateInvalid:
        raise
    except TooMuchWork as exc:
        raise TemplateInvalid(part, _template_line(), f"does too much work: {exc}") from None
    except SecurityError as exc:
        raise TemplateInvalid(part, _template_line(), f"not allowed: {exc}") from None
    except TemplateError as exc:
        raise TemplateInvalid(part, _template_line(), exc.message or str(exc)) from None
    except MemoryError:
        raise TemplateInvalid(part, _template_line(), "needs too much memory") from None
    except Exception as exc:  # whatever a filter or method raises on what it is given
        raise TemplateInvalid(part, _template_line(), f"{type(exc).__name__}: {exc}") from None
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
