"""Input types shared by request schemas: text no database will choke on, UTC times given
as ISO 8601 only, and `Input`, the base of request bodies, which takes numbers and booleans
only as JSON numbers and booleans."""

from __future__ import annotations

import json
import re
import types
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin

from fastapi import Path, Query
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    GetJsonSchemaHandler,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from memberhub.kit.errors import ValidationFailed

_JSON_NAMES = {bool: "boolean", int: "integer", float: "number"}


def _exact_type(annotation: Any) -> type | None:
    """bool, int or float when that (or it or None) is all a field takes; else None."""
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = {_bare(arg) for arg in get_args(annotation) if arg is not type(None)}
    else:
        kinds = {_bare(annotation)}
    if kinds == {bool}:
        return bool
    if kinds == {int}:
        return int
    if kinds and kinds <= {int, float}:
        return float
    return None


def _bare(annotation: Any) -> Any:
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


class Input(BaseModel):
    """A request body: unknown fields are refused, and a field declared as an integer, a
    number or a boolean takes only that JSON type (`true` is not 1, `"100"` and `1.0` are
    not integers, `0` is not false)."""

    model_config = ConfigDict(extra="forbid")
    _exact_types: ClassVar[dict[type, dict[str, type]]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _json_type_as_declared(cls, value: Any, info: ValidationInfo) -> Any:
        exact = Input._exact_types.get(cls)
        if exact is None:
            exact = Input._exact_types[cls] = {
                name: kind
                for name, field in cls.model_fields.items()
                if (kind := _exact_type(field.annotation)) is not None
            }
        kind = exact.get(info.field_name or "")
        if kind is None or value is None:
            return value
        if isinstance(value, bool):
            ok = kind is bool
        elif kind is int:
            ok = isinstance(value, int)
        elif kind is float:
            ok = isinstance(value, int | float)
        else:
            ok = False
        if not ok:
            raise PydanticCustomError(
                "exact_type",
                "must be a JSON {expected}, not {given}",
                {"expected": _JSON_NAMES[kind], "given": _json_name(value)},
            )
        return value


class PatchInput(Input):
    """A PATCH body: only the fields sent change. The fields in `not_nullable` may be left
    out but not set to null (the object always has them): null is refused, and their schema
    does not offer it."""

    not_nullable: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _no_null_for_not_nullable(self) -> Any:
        for name in self.not_nullable:
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler.resolve_ref_schema(
            super().__get_pydantic_json_schema__(core_schema, handler)
        )
        for name in cls.not_nullable:
            field = schema["properties"][name]
            field.pop("default", None)
            kinds = [kind for kind in field.pop("anyOf", []) if kind != {"type": "null"}]
            if len(kinds) == 1:
                field.update({**kinds[0], **field})
            elif kinds:
                field["anyOf"] = kinds
        return schema


def _json_name(value: Any) -> str:
    if isinstance(value, bool | int | float):
        return json.dumps(value)  # true, 1.0
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


_NUMBER = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$")


def _iso_only(value: Any) -> Any:
    """Refuse numbers (and numeric text), which pydantic would read as Unix timestamps."""
    if isinstance(value, int | float) or (isinstance(value, str) and _NUMBER.match(value)):
        raise PydanticCustomError(
            "iso_8601", "must be an ISO 8601 date or date-time, e.g. 2025-01-31T09:00:00Z"
        )
    return value


def _no_control_chars(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


class _NoNulDocumented:
    """Says in the JSON schema what `_no_control_chars` checks (a pattern constraint would
    check it too, with a less telling message)."""

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        schema.setdefault("pattern", r"^[^\x00]*$")
        return schema


def _as_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError("is out of the supported range") from exc


Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100),
    AfterValidator(_no_control_chars),
    _NoNulDocumented(),
]
ShortText = Annotated[
    str,
    StringConstraints(strip_whitespace=True, max_length=200),
    AfterValidator(_no_control_chars),
    _NoNulDocumented(),
]
LongText = Annotated[
    str,
    StringConstraints(max_length=1000),
    AfterValidator(_no_control_chars),
    _NoNulDocumented(),
]


def field_errors(exc: ValidationError, *, prefix: Sequence[str] = ()) -> list[dict[str, Any]]:
    """A model's refusal in the shape of every VALIDATION_ERROR's `fields` (`loc`, `message`,
    `type`), plus the dotted `field`; `prefix` is where the model sits in the body."""
    found = []
    for error in exc.errors(include_url=False, include_input=False):
        parts = [*prefix, *(str(part) for part in error["loc"])]
        found.append(
            {
                "loc": ["body", *parts],
                "field": ".".join(parts),
                "message": error["msg"],
                "type": error["type"],
            }
        )
    return found


def refusal(exc: ValidationError, message: str = "") -> ValidationFailed:
    """A model built by a service from what it holds, refused: `message`, then each field
    and why (the first five), with every one in `details.fields`."""
    fields = field_errors(exc)
    said = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
    return ValidationFailed(message + said, details={"fields": fields})


_NAME = TypeAdapter(Name)


def valid_name(value: str, field: str = "name") -> str:
    """`value` checked as the API checks a `Name` (stripped, 1 to 100 characters, no NUL),
    for callers that take one from elsewhere (the CLI); ValidationFailed names the field."""
    try:
        return _NAME.validate_python(value)
    except ValidationError as exc:
        raise ValidationFailed(
            f"{field}: {exc.errors()[0]['msg']}.", details={"field": field}
        ) from None


Code = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,49}$")]
UTCDatetime = Annotated[datetime, BeforeValidator(_iso_only), AfterValidator(_as_utc)]
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _date_only(value: Any) -> Any:
    """A day as `YYYY-MM-DD`, nothing more: pydantic would also take a date-time at
    midnight, and drop its time and zone."""
    value = _iso_only(value)
    if isinstance(value, str) and not _DATE.match(value.strip()):
        raise PydanticCustomError("iso_date", "must be a date, YYYY-MM-DD")
    return value


ISODate = Annotated[date, BeforeValidator(_date_only)]

# A path segment holding a public id; malformed ids are rejected before any lookup.
IdPath = Annotated[str, Path(pattern=r"^[a-z]{2,4}_[0-9a-z]{1,40}$", max_length=45)]

# A free-text query parameter (filters, search).
SafeQuery = Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00]*$")]
