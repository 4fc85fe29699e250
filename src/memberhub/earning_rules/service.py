"""Earning rules: staff define them, each change saves a new version, and nothing invalid is
ever saved: a rule is checked as a whole (its condition tree, its effect, its caps) and
refused with the path of every problem. Rules are installation-wide, like the program's
settings: only keys bound to no organisation change them. A rule is archived, never
deleted, so every transaction it produced still names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.service import diff, record_write
from memberhub.auth.principal import Principal
from memberhub.earning_rules import conditions
from memberhub.earning_rules.conditions import Problem, problems_at
from memberhub.earning_rules.models import EarningRule, EarningRuleVersion
from memberhub.earning_rules.repository import EarningRuleRepository
from memberhub.earning_rules.schemas import (
    EFFECT,
    Caps,
    Effect,
    ExtendExpiry,
    Multiplier,
    PointsPerAmount,
    RuleCreate,
    RuleOut,
    RulePatch,
    RuleVersionOut,
)
from memberhub.kit.clock import utcnow
from memberhub.kit.errors import Conflict, NotFound, ValidationFailed
from memberhub.kit.ids import new_public_id

# What a version records: everything evaluation reads, and the rule's name.
DEFINITION_FIELDS = (
    "name",
    "description",
    "active",
    "priority",
    "stop_processing",
    "conditions",
    "effect",
    "caps",
)


class RuleNotFound(NotFound):
    code = "EARNING_RULE_NOT_FOUND"
    default_message = "The earning rule does not exist."


def to_out(rule: EarningRule) -> RuleOut:
    return RuleOut(
        id=rule.public_id,
        name=rule.name,
        description=rule.description,
        active=rule.active,
        archived_at=rule.archived_at,
        priority=rule.priority,
        stop_processing=rule.stop_processing,
        conditions=dict(rule.conditions),
        effect=dict(rule.effect),
        caps=dict(rule.caps),
        version=rule.version,
        created_at=rule.created_at,
        updated_at=rule.updated_at,
    )


def version_out(rule: EarningRule, version: EarningRuleVersion) -> RuleVersionOut:
    return RuleVersionOut(
        rule_id=rule.public_id,
        version=version.version,
        definition=dict(version.definition),
        actor=version.actor,
        created_at=version.created_at,
    )


def definition_of(rule: EarningRule) -> dict[str, Any]:
    return {name: getattr(rule, name) for name in DEFINITION_FIELDS}


def _effect_problems(effect: Effect, caps: Caps) -> list[Problem]:
    problems = []
    if isinstance(effect, PointsPerAmount | Multiplier) and effect.max_points is None:
        problems.append(
            Problem(
                ("effect", "max_points"),
                f"a {effect.type} effect is unbounded without max_points, the most one "
                "activity may earn from it",
                "unbounded_effect",
            )
        )
    if isinstance(effect, ExtendExpiry):
        if effect.mode == "add" and effect.days is None:
            problems.append(Problem(("effect", "days"), "`add` needs the days to add", "missing"))
        for name in ("per_member_per_day", "per_member_per_month", "overall"):
            limit = getattr(caps, name)
            if limit is not None and limit.points is not None:
                problems.append(
                    Problem(
                        ("caps", name, "points"),
                        "an extend_expiry rule credits no points; cap its awards instead",
                        "not_applicable",
                    )
                )
    return problems


async def check_definition(
    session: AsyncSession, tree: dict[str, Any], effect: Effect, caps: Caps
) -> None:
    """Refuse a rule with any problem (422, every problem with its path): a condition on an
    unknown field or with a value of the wrong type, an organisation that does not exist,
    an unbounded effect, a cap that cannot apply."""
    problems, organisations = conditions.check(tree)
    if organisations and not problems:
        known = await EarningRuleRepository(session).organisation_ids(organisations)
        for missing in sorted(organisations - set(known)):
            problems += _organisation_problems(tree, missing)
    problems += _effect_problems(effect, caps)
    if problems:
        raise ValidationFailed(
            "The earning rule is not valid.", details={"fields": problems_at(problems)}
        )


def _organisation_problems(tree: Any, public_id: str, path: conditions.Path = ()) -> list[Problem]:
    """The paths in `tree` where the missing organisation `public_id` is named."""
    path = path or ("conditions",)
    found: list[Problem] = []
    if isinstance(tree, dict):
        if tree.get("field") == "member.organisation_id":
            value = tree.get("value")
            if value == public_id:
                found.append(
                    Problem((*path, "value"), f"no organisation {public_id}", "unknown_reference")
                )
            elif isinstance(value, list):
                for index, item in enumerate(value):
                    if item == public_id:
                        found.append(
                            Problem(
                                (*path, "value", index),
                                f"no organisation {public_id}",
                                "unknown_reference",
                            )
                        )
        for key in ("all", "any"):
            for index, child in enumerate(tree.get(key) or []):
                found += _organisation_problems(child, public_id, (*path, key, index))
        if "not" in tree:
            found += _organisation_problems(tree["not"], public_id, (*path, "not"))
    return found


def _dump_effect(effect: Effect) -> dict[str, Any]:
    return effect.model_dump(mode="json", exclude_none=True)


def _dump_caps(caps: Caps) -> dict[str, Any]:
    return caps.model_dump(mode="json", exclude_none=True)


def _save_version(session: AsyncSession, principal: Principal, rule: EarningRule) -> None:
    session.add(
        EarningRuleVersion(
            rule_id=rule.id,
            version=rule.version,
            definition=definition_of(rule),
            actor=principal.actor.id,
            created_at=rule.updated_at,
        )
    )


async def create_rule(
    session: AsyncSession, principal: Principal, payload: RuleCreate
) -> EarningRule:
    principal.require_installation_wide("Earning rules")
    await check_definition(session, payload.conditions, payload.effect, payload.caps)
    now = utcnow()
    rule = EarningRule(
        public_id=new_public_id("erl"),
        name=payload.name,
        description=payload.description,
        active=payload.active,
        priority=payload.priority,
        stop_processing=payload.stop_processing,
        conditions=payload.conditions,
        effect=_dump_effect(payload.effect),
        caps=_dump_caps(payload.caps),
        version=1,
        created_at=now,
        updated_at=now,
    )
    session.add(rule)
    await session.flush()
    _save_version(session, principal, rule)
    record_write(
        session,
        principal.actor,
        action="earning_rule.create",
        object_type="earning_rule",
        object_id=rule.public_id,
        changes=diff({}, definition_of(rule)),
    )
    return rule


async def get_rule(
    session: AsyncSession, public_id: str, *, for_update: bool = False
) -> EarningRule:
    rule = await EarningRuleRepository(session).get_by_public_id(public_id, for_update=for_update)
    if rule is None:
        raise RuleNotFound(f"Earning rule {public_id} does not exist.")
    return rule


def _refuse_archived(rule: EarningRule) -> None:
    if rule.archived_at is not None:
        raise Conflict(
            f"Earning rule {rule.public_id} is archived.",
            code="EARNING_RULE_ARCHIVED",
            details={"archived_at": rule.archived_at.isoformat()},
        )


async def update_rule(
    session: AsyncSession, principal: Principal, public_id: str, payload: RulePatch
) -> EarningRule:
    """Apply the fields sent; the rule as a whole is checked again, and any change saves a
    new version (activities evaluated from now on name it)."""
    principal.require_installation_wide("Earning rules")
    rule = await get_rule(session, public_id, for_update=True)
    _refuse_archived(rule)
    fields = payload.model_dump(exclude_unset=True)
    for name in ("name", "active", "priority", "stop_processing", "effect"):
        if name in fields and fields[name] is None:
            problem = Problem((name,), f"{name} cannot be null", "missing")
            raise ValidationFailed(
                "The earning rule is not valid.", details={"fields": problems_at([problem])}
            )
    effect = payload.effect or EFFECT.validate_python(rule.effect)
    caps = (payload.caps or Caps()) if "caps" in fields else Caps.model_validate(rule.caps)
    tree = (payload.conditions or {}) if "conditions" in fields else dict(rule.conditions)
    await check_definition(session, tree, effect, caps)
    before = definition_of(rule)
    simple = ("name", "description", "active", "priority", "stop_processing")
    after = {
        **before,
        **{name: fields[name] for name in simple if name in fields},
        "conditions": tree,
        "effect": _dump_effect(effect),
        "caps": _dump_caps(caps),
    }
    changes = diff(before, after)
    if not changes:
        return rule
    for name in DEFINITION_FIELDS:
        setattr(rule, name, after[name])
    rule.version += 1
    rule.updated_at = utcnow()
    await session.flush()
    _save_version(session, principal, rule)
    record_write(
        session,
        principal.actor,
        action="earning_rule.update",
        object_type="earning_rule",
        object_id=rule.public_id,
        changes={**changes, "version": rule.version},
    )
    return rule


async def archive_rule(session: AsyncSession, principal: Principal, public_id: str) -> None:
    """Stop evaluating the rule for good; it stays readable with its versions."""
    principal.require_installation_wide("Earning rules")
    rule = await get_rule(session, public_id, for_update=True)
    if rule.archived_at is not None:
        return
    now = utcnow()
    rule.archived_at = now
    rule.updated_at = now
    await session.flush()
    record_write(
        session,
        principal.actor,
        action="earning_rule.archive",
        object_type="earning_rule",
        object_id=rule.public_id,
        changes={"archived_at": now.isoformat()},
    )


async def versions_page(
    session: AsyncSession, rule: EarningRule, *, after_id: int | None, limit: int
) -> Sequence[EarningRuleVersion]:
    return await EarningRuleRepository(session).versions(rule.id, after_id=after_id, limit=limit)
