"""Mailchimp (Marketing API 3.0): the audience, its static segments, Customer Journey
triggers and the list's webhooks.

The API lives on the account's data centre, `https://<dc>.api.mailchimp.com/3.0`, where
`<dc>` is the API key's suffix (`…-us21`); an OAuth token has no suffix, so `server_prefix`
names it (the OAuth connect uses Mailchimp's authorization server with the app's
`client_id` and `client_secret`). An API key is sent as HTTP Basic (any user name, the key
as the password), an OAuth token as a bearer token.

Members are written with the batch subscribe endpoint, `POST /lists/{list_id}`: up to 500
members a call, `update_existing` so a member already on the list is updated rather than
refused, and `sync_tags` so each member's tags become exactly those sent (a tier tag
replaced, not added beside the old one). It answers at once with a result per member.
The batch operations endpoint (`POST /batches`) would take more members per call but runs
them later and reports through a results archive to poll and download: more calls, not
fewer, and a result known only minutes after. Merge fields, status and tags all travel in
the batch subscribe body, so 500 members cost one call whatever changed.

Static segments: created empty (`POST /lists/{id}/segments`, `static_segment: []`) and
changed with `members_to_add`/`members_to_remove`, up to 500 addresses each per call.

Webhooks carry no signature: the URL given to Mailchimp carries a secret (`?token=…`),
compared in constant time with `credentials.webhook_secret`. Mailchimp checks a webhook
URL with a GET before it posts to it; the inbound endpoint answers that GET.

Mailchimp allows 10 connections at once per API key and answers one more with 429: the
gateway keeps at most 10 calls of an integration in flight (per process).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar

from pydantic import Field, StringConstraints

from memberhub.integrations import signatures
from memberhub.integrations.gateway import VENDOR_POLICIES, GatewayPolicy
from memberhub.integrations.providers.base import (
    AudienceChange,
    AudienceMember,
    BaseConfig,
    BaseCredentials,
    Capability,
    Connection,
    ConnectionFailed,
    InboundIdentity,
    InboundRequest,
    MarketingListError,
    OAuthSettings,
    Provider,
    SegmentMissing,
    WriteResult,
)
from memberhub.marketing.settings import MarketingSyncSettings

Secret = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]
ServerPrefix = Annotated[
    str, StringConstraints(strip_whitespace=True, pattern=r"^[a-z]{2,4}\d{1,3}$")
]

BATCH_MEMBERS = 500
SEGMENT_CHANGES = 500
CONNECTIONS = 10
_DATA_CENTRE = re.compile(r"-([a-z]{2,4}\d{1,3})$")
# The list webhook's event types that say something about a member.
WEBHOOK_KINDS = {
    "unsubscribe": "unsubscribed",
    "cleaned": "cleaned",
    "profile": "profile",
    "upemail": "email_changed",
}


def data_centre(api_key: str) -> str | None:
    """The data centre an API key belongs to (`us21` of `…-us21`)."""
    match = _DATA_CENTRE.search(api_key.strip())
    return match.group(1) if match else None


def subscriber_hash(email: str) -> str:
    """Mailchimp's id of a list member: the MD5 of the lower-cased address."""
    return hashlib.md5(email.strip().lower().encode("utf-8"), usedforsecurity=False).hexdigest()


class MailchimpConfig(MarketingSyncSettings, BaseConfig):
    server_prefix: ServerPrefix | None = Field(
        default=None,
        description="The account's data centre (`us21`) for OAuth tokens, which do not name "
        "it; an API key's suffix is used otherwise.",
    )


class MailchimpCredentials(BaseCredentials):
    api_key: Secret | None = Field(
        default=None, description="An API key (`…-us21`); its suffix is the data centre."
    )
    access_token: Secret | None = Field(
        default=None, description="An OAuth 2 access token (kept here by the OAuth connect)."
    )
    client_id: Secret | None = Field(default=None, description="The OAuth app's client id.")
    client_secret: Secret | None = Field(default=None, description="The OAuth app's client secret.")
    webhook_secret: (
        Annotated[str, StringConstraints(strip_whitespace=True, min_length=16, max_length=200)]
        | None
    ) = Field(
        default=None,
        description="The secret the list webhook's URL carries as `?token=`; webhooks "
        "without it are refused.",
    )


class Mailchimp(Provider):
    name = "mailchimp"
    title = "Mailchimp"
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.MARKETING_LIST, Capability.EVENTS_SOURCE}
    )
    batch_size = BATCH_MEMBERS
    segment_batch_size = SEGMENT_CHANGES
    concurrency = CONNECTIONS
    config_model = MailchimpConfig
    credentials_model = MailchimpCredentials
    policy: ClassVar[GatewayPolicy] = VENDOR_POLICIES["mailchimp"]
    # Mailchimp's access tokens do not expire (no refresh token is issued).
    oauth_defaults = OAuthSettings(
        authorize_url="https://login.mailchimp.com/oauth2/authorize",
        token_url="https://login.mailchimp.com/oauth2/token",
        scopes=[],
    )
    # Mailchimp's webhook validator expects a plain 200 to a GET of the URL.
    answers_validation_get = True

    def base_url_for(self, config: BaseConfig, credentials: Mapping[str, Any]) -> str | None:
        if config.base_url:
            return config.base_url
        prefix = getattr(config, "server_prefix", None)
        api_key = credentials.get("api_key")
        if isinstance(api_key, str) and not (credentials.get("access_token") and prefix):
            prefix = data_centre(api_key) or prefix
        return f"https://{prefix}.api.mailchimp.com/3.0" if prefix else None

    def auth_headers(self, credentials: Mapping[str, Any]) -> dict[str, str]:
        token = credentials.get("access_token")
        if token:
            return {"Authorization": f"Bearer {token}"}
        api_key = credentials.get("api_key")
        if not api_key:
            return {}
        basic = base64.b64encode(f"memberhub:{api_key}".encode()).decode("ascii")
        return {"Authorization": f"Basic {basic}"}

    def validate(self, config: BaseConfig, credentials: BaseCredentials) -> None:
        assert isinstance(credentials, MailchimpCredentials)
        if not (credentials.api_key or credentials.access_token or credentials.client_id):
            raise ValueError(
                "set credentials.api_key, or client_id and client_secret to connect with OAuth"
            )
        located = bool(config.base_url or getattr(config, "server_prefix", None))
        if credentials.access_token or credentials.client_id:
            if not located:
                raise ValueError(
                    "an OAuth connection needs config.server_prefix (such as us21): the "
                    "account's data centre, which its tokens do not name"
                )
        elif credentials.api_key and data_centre(credentials.api_key) is None and not located:
            raise ValueError(
                "the API key has no data centre suffix (such as -us21): copy the whole key"
            )

    async def check_connection(self, connection: Connection) -> str:
        response = await connection.gateway.request("GET", "/ping")
        if response.status_code != 200:
            raise ConnectionFailed(
                f"Mailchimp answered {response.status_code}: {_detail(response)}"
            )
        list_id = getattr(connection.config, "list_id", None)
        if list_id:
            found = await connection.gateway.request("GET", f"/lists/{_segment(list_id)}")
            if found.status_code != 200:
                raise ConnectionFailed(f"Mailchimp has no audience {list_id}: {_detail(found)}")
            name = (found.json() or {}).get("name")
            return f"connected to Mailchimp; audience {name!r}"
        return "connected to Mailchimp"

    # ------------------------------------------------------------ the audience

    async def write_members(
        self, connection: Connection, list_id: str, members: Sequence[AudienceMember]
    ) -> list[WriteResult]:
        if len(members) > self.batch_size:
            raise ValueError(f"at most {self.batch_size} members a call")
        body = {
            "members": [
                {
                    "email_address": m.email,
                    "status": m.status,
                    "merge_fields": dict(m.merge_fields),
                    "tags": list(m.tags),
                }
                for m in members
            ],
            "update_existing": True,
            "sync_tags": True,
        }
        # Sending the same members again sets the same values: safe to retry.
        response = await connection.gateway.request(
            "POST", f"/lists/{_segment(list_id)}", json=body, retry_safe=True
        )
        answer = _json(response)
        errors: dict[str, str] = {}
        for error in answer.get("errors") or []:
            if isinstance(error, dict):
                email = str(error.get("email_address") or "").lower()
                errors[email] = str(error.get("error") or "refused")[:500]
        created = {
            str(m.get("email_address") or "").lower()
            for m in answer.get("new_members") or []
            if isinstance(m, dict)
        }
        written = created | {
            str(m.get("email_address") or "").lower()
            for m in answer.get("updated_members") or []
            if isinstance(m, dict)
        }
        results = []
        for member in members:
            email = member.email.lower()
            if email in errors:
                results.append(WriteResult(member.key, None, error=errors[email]))
            elif email in written:
                results.append(
                    WriteResult(member.key, subscriber_hash(email), created=email in created)
                )
            else:
                results.append(
                    WriteResult(member.key, None, error="Mailchimp did not report the member")
                )
        return results

    async def create_static_segment(self, connection: Connection, list_id: str, name: str) -> str:
        """A new static segment; the existing one when the audience has one of that name
        (created by an earlier run whose answer was lost)."""
        path = f"/lists/{_segment(list_id)}/segments"
        response = await connection.gateway.request(
            "POST", path, json={"name": name, "static_segment": []}
        )
        if response.status_code == 400:
            existing = await connection.gateway.request(
                "GET", path, params={"type": "static", "count": 1000}
            )
            for segment in _json(existing).get("segments") or []:
                if isinstance(segment, dict) and segment.get("name") == name:
                    return str(segment["id"])
        return str(_json(response)["id"])

    async def change_segment(
        self,
        connection: Connection,
        list_id: str,
        segment_id: str,
        *,
        add: Sequence[str],
        remove: Sequence[str],
    ) -> None:
        if len(add) > self.segment_batch_size or len(remove) > self.segment_batch_size:
            raise ValueError(f"at most {self.segment_batch_size} addresses each a call")
        body: dict[str, Any] = {}
        if add:
            body["members_to_add"] = list(add)
        if remove:
            body["members_to_remove"] = list(remove)
        response = await connection.gateway.request(
            "POST",
            f"/lists/{_segment(list_id)}/segments/{_segment(segment_id)}",
            json=body,
            retry_safe=True,
        )
        if response.status_code == 404:
            raise SegmentMissing(f"Mailchimp answered 404: {_detail(response)}")
        _json(response)

    async def trigger_journey(
        self, connection: Connection, journey_id: str, step_id: str, email: str
    ) -> None:
        path = (
            f"/customer-journeys/journeys/{_segment(journey_id)}/steps/{_segment(step_id)}"
            "/actions/trigger"
        )
        response = await connection.gateway.request("POST", path, json={"email_address": email})
        if response.status_code != 204:
            _json(response)

    # ------------------------------------------------------------ webhooks

    def verify(
        self, request: InboundRequest, connection_secrets: Mapping[str, Any], config: BaseConfig
    ) -> None:
        if not webhook_token_matches(request.url, connection_secrets):
            raise signatures.SignatureInvalid(
                signatures.NO_MATCHING_SIGNATURE,
                "the webhook URL's token does not match credentials.webhook_secret",
            )

    def identify(self, request: InboundRequest) -> InboundIdentity:
        """Mailchimp's webhooks have no id: one is made of the whole body, which names the
        event, its time and its address, so a resent webhook is recognised."""
        fields = _form(request.body)
        event_type = fields.get("type")
        if not event_type:
            raise ValueError("the body has no Mailchimp webhook type")
        digest = hashlib.sha256(request.body).hexdigest()
        return InboundIdentity(event_id=f"mc-{digest}", event_type=event_type[:255])

    def audience_changes(self, event_type: str, body: bytes) -> list[AudienceChange]:
        kind = WEBHOOK_KINDS.get(event_type)
        if kind is None:
            return []
        fields = _form(body)
        if kind == "email_changed":
            old, new = fields.get("data[old_email]"), fields.get("data[new_email]")
            if not old or not new:
                return []
            return [AudienceChange("email_changed", old, new_email=new)]
        email = fields.get("data[email]")
        if not email:
            return []
        if kind == "profile":
            return [
                AudienceChange(
                    "profile",
                    email,
                    first_name=fields.get("data[merges][FNAME]") or None,
                    last_name=fields.get("data[merges][LNAME]") or None,
                )
            ]
        reason = fields.get("data[reason]") or fields.get("data[action]") or None
        return [AudienceChange(kind, email, reason=reason)]  # type: ignore[arg-type]


def webhook_token_matches(url: str, credentials: Mapping[str, Any]) -> bool:
    """Whether the URL's `token` query parameter is the integration's webhook secret,
    compared in constant time."""
    secret = credentials.get("webhook_secret")
    if not isinstance(secret, str) or not secret:
        return False
    tokens = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query).get("token") or [""]
    return hmac.compare_digest(tokens[0].encode(), secret.encode())


def _form(body: bytes) -> dict[str, str]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the body is not UTF-8 text") from None
    return dict(urllib.parse.parse_qsl(text, keep_blank_values=True))


def _segment(value: str) -> str:
    """A path segment: ids from settings never reach another path."""
    return urllib.parse.quote(str(value), safe="")


def _detail(response: Any) -> str:
    try:
        answer = response.json()
    except ValueError:
        return str(response.text[:200])
    if isinstance(answer, dict):
        return f"{answer.get('title', '')}: {answer.get('detail', '')}"[:300]
    return str(response.text[:200])


def _json(response: Any) -> dict[str, Any]:
    """The body of a 2xx; MarketingListError with Mailchimp's problem detail otherwise."""
    if response.status_code >= 400:
        raise MarketingListError(f"Mailchimp answered {response.status_code}: {_detail(response)}")
    try:
        answer = response.json()
    except (ValueError, json.JSONDecodeError):
        raise MarketingListError(
            f"Mailchimp answered {response.status_code} without JSON"
        ) from None
    if not isinstance(answer, dict):
        raise MarketingListError("Mailchimp's answer is not an object")
    return answer
