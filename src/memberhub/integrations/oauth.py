"""OAuth 2.0 connections (authorization code with PKCE, RFC 7636).

`authorize` records a single-use state (stored hashed) with its PKCE verifier (stored
encrypted) and returns the provider's authorization URL. The provider sends the user back
to `callback` with a code and the state; the code is exchanged for tokens, which are kept
in the integration's encrypted credentials. The hub refreshes them from then on.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from datetime import timedelta
from urllib.parse import urlencode

from sqlalchemy import select

from memberhub.auth.principal import Principal
from memberhub.integrations import vault
from memberhub.integrations.gateway import CircuitOpen, GatewayError
from memberhub.integrations.hub import IntegrationHub, parse_config, token_fields
from memberhub.integrations.models import Integration, OAuthAuthorization
from memberhub.integrations.providers import get_provider
from memberhub.integrations.schemas import AuthorizeOut, CallbackOut
from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.kit.errors import BadRequest, Conflict, MemberhubError
from memberhub.webhooks.ssrf import DestinationRefused

STATE_LIFETIME = timedelta(minutes=10)


class OAuthNotConfigured(Conflict):
    code = "OAUTH_NOT_CONFIGURED"


class OAuthStateInvalid(BadRequest):
    code = "OAUTH_STATE_INVALID"


class OAuthExchangeFailed(MemberhubError):
    code = "OAUTH_EXCHANGE_FAILED"
    status_code = 502


def _state_hash(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


def _challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def redirect_uri(public_url: str, integration_public_id: str) -> str:
    return f"{public_url.rstrip('/')}/api/v1/integrations/{integration_public_id}/oauth/callback"


async def authorize(
    db: Database,
    box: SecretBox,
    principal: Principal,
    integration: Integration,
    *,
    public_url: str,
) -> AuthorizeOut:
    provider = get_provider(integration.provider)
    assert provider is not None
    settings = provider.oauth_settings(parse_config(provider, integration.config))
    credentials = vault.unseal(box, integration.credentials)
    if settings is None or not settings.authorize_url or not settings.token_url:
        raise OAuthNotConfigured(
            f"{provider.title} integrations need config.oauth.authorize_url and token_url "
            "for OAuth."
        )
    if not credentials.get("client_id") or not credentials.get("client_secret"):
        raise OAuthNotConfigured(
            "Set credentials.client_id and credentials.client_secret (the OAuth app's) first."
        )
    state = secrets.token_urlsafe(32)
    verifier = secrets.token_urlsafe(64)
    callback = redirect_uri(public_url, integration.public_id)
    now = utcnow()
    expires_at = now + STATE_LIFETIME
    async with db.transaction() as session:
        session.add(
            OAuthAuthorization(
                integration_id=integration.id,
                state_hash=_state_hash(state),
                code_verifier=box.encrypt(verifier),
                redirect_uri=callback,
                created_by=principal.actor.id,
                created_at=now,
                expires_at=expires_at,
            )
        )
    query = {
        "response_type": "code",
        "client_id": credentials["client_id"],
        "redirect_uri": callback,
        "state": state,
        "code_challenge": _challenge(verifier),
        "code_challenge_method": "S256",
    }
    if settings.scopes:
        query["scope"] = " ".join(settings.scopes)
    separator = "&" if "?" in settings.authorize_url else "?"
    return AuthorizeOut(
        authorization_url=f"{settings.authorize_url}{separator}{urlencode(query)}",
        expires_at=expires_at,
    )


async def callback(
    db: Database,
    box: SecretBox,
    hub: IntegrationHub,
    integration_public_id: str,
    *,
    code: str | None,
    state: str | None,
    error: str | None,
) -> CallbackOut:
    if not state:
        raise OAuthStateInvalid("The callback has no state.")
    now = utcnow()
    # The state is spent before the code is exchanged: a replayed callback gets nothing.
    async with db.transaction() as session:
        pending = await session.scalar(
            select(OAuthAuthorization)
            .where(OAuthAuthorization.state_hash == _state_hash(state))
            .with_for_update()
        )
        integration = await session.get(Integration, pending.integration_id) if pending else None
        if (
            pending is None
            or integration is None
            or integration.public_id != integration_public_id
            or pending.used_at is not None
            or pending.expires_at <= now
        ):
            raise OAuthStateInvalid(
                "The state is unknown, used or expired; start again with …/oauth/authorize."
            )
        pending.used_at = now
        verifier = box.decrypt(pending.code_verifier)
        callback_uri = pending.redirect_uri
    if error:
        raise OAuthExchangeFailed(f"The provider refused the authorization: {error[:200]}.")
    if not code:
        raise OAuthStateInvalid("The callback has no code.")
    credentials = vault.unseal(box, integration.credentials)
    try:
        response = await hub.request_token(
            integration,
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": callback_uri,
                "client_id": credentials.get("client_id", ""),
                "client_secret": credentials.get("client_secret", ""),
                "code_verifier": verifier,
            },
        )
    except (GatewayError, CircuitOpen, DestinationRefused) as exc:
        raise OAuthExchangeFailed(f"The token endpoint could not be reached: {exc}.") from None
    finally:
        await hub.drain()
    if response is None:
        raise OAuthNotConfigured("The integration has no OAuth token URL.")
    if response.status_code != 200:
        raise OAuthExchangeFailed(
            f"The token endpoint refused the code ({response.status_code}).",
            details={"error": _error_code(response.text)},
        )
    try:
        fields = token_fields(response.json(), now=time.time())
    except ValueError as exc:  # a body that is not JSON is a ValueError too
        raise OAuthExchangeFailed(f"The token endpoint's answer is unusable: {exc}.") from None
    updated = {**credentials, **fields}
    await hub.store_credentials(integration.id, updated)
    expires = updated.get("expires_at")
    return CallbackOut(
        integration_id=integration.public_id,
        connected=True,
        expires_at=utcnow() + timedelta(seconds=expires - time.time())
        if isinstance(expires, int | float)
        else None,
    )


def _error_code(text: str) -> str:
    import json

    try:
        return str(json.loads(text).get("error", ""))[:100]
    except (ValueError, AttributeError):
        return ""
