"""The condition language of earning rules: a JSON tree that is data, checked when a rule
is saved and evaluated by walking it; nothing in it is ever executed.

A node is one of

    {"all": [node, ...]}                       every node holds (1 to 50 nodes)
    {"any": [node, ...]}                       at least one node holds
    {"not": node}                              the node does not hold
    {"field": FIELD, "op": OP, "value": VALUE} a comparison of one fact

over the facts in `FIELDS`: the activity's type, source, time and attributes, and the
member's tier, status and organisation. Each field has a kind, and the kind decides the
operators and the values it takes (`OPERATORS`). A comparison with a fact the activity
lacks is false, whatever the operator, except `exists` (`{"op": "exists", "value": false}`
holds exactly when it is absent). The empty tree `{}` holds for every activity.

`check` returns every problem of a tree with the path of the node or value at fault, so a
rule is refused with all of its mistakes named; `compile_tree` turns a checked tree into
nodes that `holds` evaluates.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from memberhub.members.models import MemberStatus

MAX_CHILDREN = 50
MAX_NODES = 200
MAX_DEPTH = 10
MAX_LIST_VALUES = 100
MAX_TEXT = 200
_SAFE_INT = 2**53 - 1
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_ORGANISATION = re.compile(r"^org_[0-9a-z]{1,40}$")
CUSTOM_PREFIX = "activity.attributes.custom."
_CUSTOM_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class Kind(StrEnum):
    TEXT = "text"
    CURRENCY = "currency"
    INTEGER = "integer"
    NUMBER = "number"
    DATETIME = "datetime"
    TEXT_LIST = "text_list"
    MEMBER_STATUS = "member_status"
    ORGANISATION = "organisation"
    # A custom attribute: text, a number or a boolean, whichever the activity sent.
    SCALAR = "scalar"


FIELDS: dict[str, Kind] = {
    "activity.type": Kind.TEXT,
    "activity.source": Kind.TEXT,
    "activity.occurred_at": Kind.DATETIME,
    "activity.attributes.amount": Kind.INTEGER,
    "activity.attributes.currency": Kind.CURRENCY,
    "activity.attributes.quantity": Kind.INTEGER,
    "activity.attributes.cpd_hours": Kind.NUMBER,
    "activity.attributes.event_id": Kind.TEXT,
    "activity.attributes.order_id": Kind.TEXT,
    "activity.attributes.booking_id": Kind.TEXT,
    "activity.attributes.category": Kind.TEXT,
    "activity.attributes.channel": Kind.TEXT,
    "activity.attributes.location": Kind.TEXT,
    "activity.attributes.tags": Kind.TEXT_LIST,
    # The skus (categories) of the activity's items: `contains` holds when one item has it.
    "activity.attributes.items.sku": Kind.TEXT_LIST,
    "activity.attributes.items.category": Kind.TEXT_LIST,
    "member.tier": Kind.TEXT,
    "member.status": Kind.MEMBER_STATUS,
    "member.organisation_id": Kind.ORGANISATION,
}

_EQUALITY = frozenset({"eq", "ne", "in", "not_in", "exists"})
_ORDER = frozenset({"gt", "gte", "lt", "lte"})
OPERATORS: dict[Kind, frozenset[str]] = {
    Kind.TEXT: _EQUALITY,
    Kind.CURRENCY: _EQUALITY,
    Kind.MEMBER_STATUS: _EQUALITY,
    Kind.ORGANISATION: _EQUALITY,
    Kind.INTEGER: _EQUALITY | _ORDER,
    Kind.NUMBER: _EQUALITY | _ORDER,
    Kind.SCALAR: _EQUALITY | _ORDER,
    Kind.DATETIME: _ORDER | {"exists"},
    Kind.TEXT_LIST: frozenset({"contains", "contains_any", "exists"}),
}
_LIST_OPERATORS = frozenset({"in", "not_in", "contains_any"})

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """What is wrong at `path` (keys and list indexes from the request body's root)."""

    path: Path
    message: str
    type: str

    @property
    def json_path(self) -> str:
        text = "$"
        for part in self.path:
            text += f"[{part}]" if isinstance(part, int) else f".{part}"
        return text


def field_kind(name: str) -> Kind | None:
    if name.startswith(CUSTOM_PREFIX):
        key = name.removeprefix(CUSTOM_PREFIX)
        return Kind.SCALAR if _CUSTOM_KEY.match(key) else None
    return FIELDS.get(name)


# ---------------------------------------------------------------- checking


@dataclass
class _Check:
    problems: list[Problem] = field(default_factory=list)
    organisations: set[str] = field(default_factory=set)
    nodes: int = 0

    def problem(self, path: Path, message: str, kind: str) -> None:
        self.problems.append(Problem(path, message, kind))


def check(tree: Any, path: Path = ("conditions",)) -> tuple[list[Problem], set[str]]:
    """Every problem of a condition tree, and the organisation ids it names (which the
    caller checks exist)."""
    state = _Check()
    if not isinstance(tree, dict):
        state.problem(path, "must be a JSON object (a condition node, or {} for none)", "type")
    elif tree:
        _check_node(tree, path, 1, state)
    return state.problems, state.organisations


def _check_node(node: Any, path: Path, depth: int, state: _Check) -> None:
    state.nodes += 1
    if state.nodes == MAX_NODES + 1:
        state.problem(path, f"a condition tree has at most {MAX_NODES} nodes", "too_large")
    if state.nodes > MAX_NODES:
        return
    if depth > MAX_DEPTH:
        state.problem(path, f"conditions nest at most {MAX_DEPTH} deep", "too_deep")
        return
    if not isinstance(node, dict):
        state.problem(path, "must be a condition node (a JSON object)", "type")
        return
    keys = set(node)
    if keys & {"all", "any"}:
        (name,) = sorted(keys & {"all", "any"})[:1]
        _only(node, {name}, path, state)
        children = node[name]
        if not isinstance(children, list) or not 1 <= len(children) <= MAX_CHILDREN:
            state.problem(
                (*path, name), f"must be a list of 1 to {MAX_CHILDREN} condition nodes", "type"
            )
            return
        for index, child in enumerate(children):
            _check_node(child, (*path, name, index), depth + 1, state)
    elif "not" in keys:
        _only(node, {"not"}, path, state)
        _check_node(node["not"], (*path, "not"), depth + 1, state)
    elif "field" in keys:
        _check_comparison(node, path, state)
    else:
        state.problem(
            path, "a condition node has `all`, `any`, `not`, or `field`, `op` and `value`", "type"
        )


def _only(node: dict[str, Any], allowed: set[str], path: Path, state: _Check) -> None:
    for key in sorted(set(node) - allowed):
        state.problem((*path, key), f"unknown key next to `{min(allowed)}`", "unknown_key")


def _check_comparison(node: dict[str, Any], path: Path, state: _Check) -> None:
    _only(node, {"field", "op", "value"}, path, state)
    name = node["field"]
    kind = field_kind(name) if isinstance(name, str) else None
    if kind is None:
        close = difflib.get_close_matches(str(name), FIELDS, n=1) if isinstance(name, str) else []
        hint = f"; did you mean {close[0]!r}?" if close else f" (custom ones: {CUSTOM_PREFIX}<key>)"
        state.problem((*path, "field"), f"unknown field {name!r}{hint}", "unknown_field")
        return
    op = node.get("op")
    if not isinstance(op, str) or op not in OPERATORS[kind]:
        allowed = ", ".join(sorted(OPERATORS[kind]))
        state.problem((*path, "op"), f"{name} ({kind}) takes the operators {allowed}", "operator")
        return
    if "value" not in node:
        state.problem((*path, "value"), "a comparison needs a value", "missing")
        return
    value = node["value"]
    if op == "exists":
        if not isinstance(value, bool):
            state.problem((*path, "value"), "`exists` takes true or false", "type_mismatch")
        return
    if op in _LIST_OPERATORS:
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_LIST_VALUES:
            state.problem(
                (*path, "value"), f"`{op}` takes a list of 1 to {MAX_LIST_VALUES} values", "type"
            )
            return
        for index, item in enumerate(value):
            _check_value(name, kind, item, (*path, "value", index), state)
        return
    if op in _ORDER and isinstance(value, bool):
        # A custom attribute may hold true or false, but nothing is more or less than one:
        # saved, the comparison could never hold.
        state.problem(
            (*path, "value"),
            f"`{op}` compares numbers or text, not {_json_name(value)}",
            "type_mismatch",
        )
        return
    _check_value(name, kind, value, (*path, "value"), state)


def _check_value(name: str, kind: Kind, value: Any, path: Path, state: _Check) -> None:
    """A single value compared with field `name`, of `kind` (an element's kind for lists)."""
    expected = _problem_with(kind, value)
    if expected is not None:
        state.problem(path, f"{name} is {expected}; got {_json_name(value)}", "type_mismatch")
    elif kind == Kind.ORGANISATION:
        state.organisations.add(value)


def _holdable(text: str) -> bool:
    """Text both databases can store: no NUL, and valid Unicode (no lone surrogate, which
    a JSON `\\ud800` escape makes)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _problem_with(kind: Kind, value: Any) -> str | None:
    """What `value` should have been for `kind`, or None when it is fine."""
    if kind in (Kind.TEXT, Kind.TEXT_LIST):
        ok = isinstance(value, str) and 1 <= len(value) <= MAX_TEXT and _holdable(value)
        return None if ok else f"text (1 to {MAX_TEXT} characters)"
    if kind == Kind.CURRENCY:
        return None if isinstance(value, str) and _CURRENCY.match(value) else "an ISO currency code"
    if kind == Kind.MEMBER_STATUS:
        return None if value in MemberStatus.ALL else "one of " + ", ".join(MemberStatus.ALL)
    if kind == Kind.ORGANISATION:
        ok = isinstance(value, str) and _ORGANISATION.match(value) is not None
        return None if ok else "an organisation id (org_…)"
    if kind == Kind.INTEGER:
        ok = _is_number(value) and isinstance(value, int) and abs(value) <= _SAFE_INT
        return None if ok else "an integer"
    if kind == Kind.NUMBER:
        return None if _is_number(value) else "a number"
    if kind == Kind.DATETIME:
        return None if _datetime(value) is not None else "an ISO 8601 date-time with a time zone"
    ok = isinstance(value, bool) or _is_number(value) or _problem_with(Kind.TEXT, value) is None
    return None if ok else "text, a number or a boolean"


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    # An int is compared as it is (one too large for a float would overflow isfinite).
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return abs(value) <= _SAFE_INT


def _datetime(value: Any) -> datetime | None:
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _json_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "a list" if isinstance(value, list) else "an object"


# ---------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Facts:
    """What conditions read: one activity and its member."""

    activity_type: str
    source: str
    occurred_at: datetime
    attributes: Mapping[str, Any]
    member_tier: str | None
    member_status: str
    member_organisation_id: int | None

    def value(self, name: str) -> Any:
        """The fact `name`, or None when the activity lacks it."""
        if name.startswith("activity.attributes."):
            key = name.removeprefix("activity.attributes.")
            if key.startswith("custom."):
                return self.attributes.get("custom", {}).get(key.removeprefix("custom."))
            if key.startswith("items."):
                items = self.attributes.get("items")
                if items is None:
                    return None
                part = key.removeprefix("items.")
                return [item[part] for item in items if item.get(part) is not None]
            return self.attributes.get(key)
        return {
            "activity.type": self.activity_type,
            "activity.source": self.source,
            "activity.occurred_at": self.occurred_at,
            "member.tier": self.member_tier,
            "member.status": self.member_status,
            "member.organisation_id": self.member_organisation_id,
        }[name]


class Node(Protocol):
    def holds(self, facts: Facts) -> bool: ...


@dataclass(frozen=True)
class All:
    nodes: tuple[Node, ...]

    def holds(self, facts: Facts) -> bool:
        return all(node.holds(facts) for node in self.nodes)


@dataclass(frozen=True)
class AnyOf:
    nodes: tuple[Node, ...]

    def holds(self, facts: Facts) -> bool:
        return any(node.holds(facts) for node in self.nodes)


@dataclass(frozen=True)
class Not:
    node: Node

    def holds(self, facts: Facts) -> bool:
        return not self.node.holds(facts)


class Always:
    def holds(self, facts: Facts) -> bool:
        return True


def _comparable(value: Any) -> tuple[str, Any]:
    """A value tagged with its JSON kind, so that true never equals 1 nor "1" equals 1."""
    if isinstance(value, bool):
        return ("boolean", value)
    if isinstance(value, int | float):
        return ("number", value)
    if isinstance(value, datetime):
        return ("datetime", value)
    return ("text", value)


@dataclass(frozen=True)
class Compare:
    field: str
    op: str
    value: Any

    def holds(self, facts: Facts) -> bool:
        actual = facts.value(self.field)
        if isinstance(actual, list) and not actual:
            # No item has the part (or an empty list of tags): the activity lacks the fact.
            actual = None
        if self.op == "exists":
            return (actual is not None) == self.value
        if actual is None:
            return False
        if self.op in ("contains", "contains_any"):
            return not self.value.isdisjoint(actual)
        tagged = _comparable(actual)
        if self.op == "eq":
            return tagged == self.value
        if self.op == "ne":
            return tagged != self.value
        if self.op == "in":
            return tagged in self.value
        if self.op == "not_in":
            return tagged not in self.value
        kind, wanted = self.value
        if tagged[0] != kind or kind == "boolean":
            return False
        left = tagged[1]
        if self.op == "gt":
            return bool(left > wanted)
        if self.op == "gte":
            return bool(left >= wanted)
        if self.op == "lt":
            return bool(left < wanted)
        return bool(left <= wanted)


def compile_tree(tree: Mapping[str, Any], organisation_ids: Mapping[str, int]) -> Node:
    """Nodes for a checked tree. `organisation_ids`: the internal id of each organisation
    the tree names (an organisation deleted since matches no member)."""
    if not tree:
        return Always()
    return _compile(tree, organisation_ids)


def _compile(node: Mapping[str, Any], organisation_ids: Mapping[str, int]) -> Node:
    if "all" in node:
        return All(tuple(_compile(child, organisation_ids) for child in node["all"]))
    if "any" in node:
        return AnyOf(tuple(_compile(child, organisation_ids) for child in node["any"]))
    if "not" in node:
        return Not(_compile(node["not"], organisation_ids))
    name, op, value = node["field"], node["op"], node["value"]
    kind = field_kind(name)
    return Compare(name, op, _compile_value(kind, op, value, organisation_ids))


def _compile_value(
    kind: Kind | None, op: str, value: Any, organisation_ids: Mapping[str, int]
) -> Any:
    if op == "exists":
        return value
    if op in ("contains", "contains_any"):
        return frozenset(value if isinstance(value, list) else [value])

    def one(item: Any) -> tuple[str, Any]:
        if kind == Kind.DATETIME:
            return ("datetime", _datetime(item))
        if kind == Kind.ORGANISATION:
            # -1 is no organisation's id: a deleted organisation's members never match.
            return ("number", organisation_ids.get(item, -1))
        return _comparable(item)

    if op in ("in", "not_in"):
        return frozenset(one(item) for item in value)
    return one(value)


def problems_at(problems: Sequence[Problem]) -> list[dict[str, Any]]:
    """Problems as the error's `details.fields` lists them (as request validation does),
    with `path` in JSONPath notation."""
    return [
        {
            "loc": ["body", *[str(part) for part in problem.path]],
            "path": problem.json_path,
            "message": problem.message,
            "type": problem.type,
        }
        for problem in problems
    ]
