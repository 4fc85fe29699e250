from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from memberhub.auth.roles import Role, Scope
from memberhub.kit.actor import Actor
from memberhub.kit.errors import Forbidden


@dataclass(frozen=True)
class Principal:
    """An authenticated caller, with what it may do and which organisations it sees: an API
    key, or a staff user signed in to the console (`key_public_id` is then the staff
    public id, `stf_…`, and `key_id` 0), who acts with the permissions of a key of the same
    role and organisation."""

    key_id: int
    key_public_id: str
    role: Role
    scopes: frozenset[Scope]
    organisation_id: int | None
    # None means every organisation (and members without one); otherwise the key's
    # organisation and all of its chapters.
    visible_organisation_ids: frozenset[int] | None
    rate_limit: str | None = None
    request_id: str | None = None
    client_ip: str | None = None

    @classmethod
    def system(cls, actor: Actor) -> Principal:
        """Unrestricted, for the CLI and jobs acting on the operator's behalf."""
        return cls(
            key_id=0,
            key_public_id=actor.id,
            role=Role.ADMIN,
            scopes=frozenset(Scope),
            organisation_id=None,
            visible_organisation_ids=None,
        )

    @property
    def actor(self) -> Actor:
        return Actor(id=self.key_public_id, request_id=self.request_id, client_ip=self.client_ip)

    @property
    def _who(self) -> str:
        return "This staff account" if self.key_public_id.startswith("stf_") else "This API key"

    def require_scope(self, scope: Scope) -> None:
        if scope not in self.scopes:
            raise Forbidden(
                f"{self._who} lacks the '{scope}' scope.",
                details={"required_scope": str(scope), "role": str(self.role)},
            )

    def can_see_organisation(self, organisation_id: int | None) -> bool:
        if self.visible_organisation_ids is None:
            return True
        return organisation_id is not None and organisation_id in self.visible_organisation_ids

    def require_organisation(self, organisation_id: int | None) -> None:
        if not self.can_see_organisation(organisation_id):
            raise Forbidden(f"{self._who} is limited to another organisation.")

    def require_installation_wide(self, what: str) -> None:
        """`what` (settings, a catalogue) is shared by the whole installation: a key or staff
        account bound to an organisation may not change it (nor read what holds other
        organisations' data)."""
        if self.organisation_id is not None:
            raise Forbidden(
                f"{what} are installation-wide; a key bound to an organisation may not use them."
            )

    def require_grantable(self, scopes: Iterable[Scope], granted_to: str) -> None:
        """Access handed out (a key, a staff account) holds no scope its grantor lacks: a
        key narrowed to managing keys cannot mint one that reads everything."""
        missing = sorted(str(scope) for scope in set(scopes) - self.scopes)
        if missing:
            raise Forbidden(
                f"{self._who} cannot give {granted_to} scopes it does not hold: "
                f"{', '.join(missing[:10])}{', …' if len(missing) > 10 else ''}.",
                code="SCOPES_NOT_HELD",
                details={"scopes": missing},
            )
