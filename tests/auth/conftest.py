"""Fixtures for the auth tests: an organisation tree with one member in each place."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.support import ApiClient


@dataclass(frozen=True)
class OrgTree:
    """HQ with chapters A and B, an unrelated HQ, and one member in each (plus one in none)."""

    hq: str
    chapter_a: str
    chapter_b: str
    other_hq: str
    member_hq: str
    member_a: str
    member_b: str
    member_other: str
    member_unassigned: str


@pytest.fixture
async def org_tree(api: ApiClient) -> OrgTree:
    hq = (await api.create_organisation())["id"]
    chapter_a = (await api.create_organisation(parent_id=hq))["id"]
    chapter_b = (await api.create_organisation(parent_id=hq))["id"]
    other_hq = (await api.create_organisation())["id"]
    return OrgTree(
        hq=hq,
        chapter_a=chapter_a,
        chapter_b=chapter_b,
        other_hq=other_hq,
        member_hq=(await api.create_member(organisation_id=hq))["id"],
        member_a=(await api.create_member(organisation_id=chapter_a))["id"],
        member_b=(await api.create_member(organisation_id=chapter_b))["id"],
        member_other=(await api.create_member(organisation_id=other_hq))["id"],
        member_unassigned=(await api.create_member())["id"],
    )
