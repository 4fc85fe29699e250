"""OpenID Connect sign-in for the console: authorization code with PKCE (Authlib), the
provider found by discovery from its issuer URL, the ID token's signature checked against
the provider's JWKS and its issuer, audience, expiry and nonce checked (joserfc)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import authlib.deprecate  # noqa: F401  (its warning filter first, ours over it)
import httpx
import structlog
from authlib.common.security import generate_token
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from memberhub.kit.errors import Unauthorized
from memberhub.settings import Settings

# Authlib 1.9 prefers the httpx2 fork and warns (with a filter of its own, set when
# `authlib.deprecate` is imported) when it falls back to httpx, which it supports.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="The httpx module is deprecated")
    from authlib.integrations.httpx_client import AsyncOAuth2Client

log = structlog.get_logger("memberhub.console.oidc")

CALLBACK_PATH = "/console/auth/callback"
DISCOVERY_TTL_SECONDS = 3600.0
TIMEOUT_SECONDS = 10.0
ALGORITHMS = ["RS256", "ES256", "PS256"]


class SsoFailed(Unauthorized):
    code = "SSO_FAILED"
    default_message = "Single sign-on did not succeed; try again or sign in with a password."


@dataclass(frozen=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str


@dataclass(frozen=True)
class AuthorizationStart:
    url: str
    state: str
    nonce: str
    code_verifier: str


@dataclass(frozen=True)
class VerifiedIdentity:
    subject: str
    email: str


class OidcClient:
    def __init__(self, settings: Settings) -> None:
        assert settings.oidc_issuer is not None
        assert settings.oidc_client_id is not None
        self.issuer = settings.oidc_issuer.rstrip("/")
        self.client_id = settings.oidc_client_id
        secret = settings.oidc_client_secret
        self.client_secret = secret.get_secret_value() if secret is not None else None
        self.redirect_uri = settings.public_url.rstrip("/") + CALLBACK_PATH
        self._metadata: tuple[float, ProviderMetadata] | None = None

    def _client(self) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=self.client_id,
            client_secret=self.client_secret,
            scope="openid email profile",
            redirect_uri=self.redirect_uri,
            code_challenge_method="S256",
            timeout=TIMEOUT_SECONDS,
        )

    async def metadata(self) -> ProviderMetadata:
        if (
            self._metadata is not None
            and time.monotonic() - self._metadata[0] < DISCOVERY_TTL_SECONDS
        ):
            return self._metadata[1]
        document = await self._get_json(f"{self.issuer}/.well-known/openid-configuration")
        try:
            metadata = ProviderMetadata(
                # Kept exactly as published: the ID token's `iss` must equal it (Auth0's
                # ends with "/"); only the comparison with the setting ignores the slash.
                issuer=str(document["issuer"]),
                authorization_endpoint=str(document["authorization_endpoint"]),
                token_endpoint=str(document["token_endpoint"]),
                jwks_uri=str(document["jwks_uri"]),
            )
        except KeyError as exc:
            log.warning("oidc_discovery_incomplete", missing=str(exc))
            raise SsoFailed() from exc
        if metadata.issuer.rstrip("/") != self.issuer:
            log.warning("oidc_issuer_mismatch", configured=self.issuer, found=metadata.issuer)
            raise SsoFailed()
        self._metadata = (time.monotonic(), metadata)
        return metadata

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            async with httpx.AsyncClient(timeout=TIMEOUT_SECONDS) as http:
                response = await http.get(url)
                response.raise_for_status()
                document = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("oidc_provider_unreachable", url=url, error=type(exc).__name__)
            raise SsoFailed() from exc
        if not isinstance(document, dict):
            raise SsoFailed()
        return document

    async def start(self) -> AuthorizationStart:
        metadata = await self.metadata()
        state, nonce, verifier = generate_token(32), generate_token(32), generate_token(64)
        async with self._client() as client:
            url, _ = client.create_authorization_url(
                metadata.authorization_endpoint, state=state, nonce=nonce, code_verifier=verifier
            )
        return AuthorizationStart(url=url, state=state, nonce=nonce, code_verifier=verifier)

    async def finish(self, *, code: str, code_verifier: str, nonce: str) -> VerifiedIdentity:
        """Exchange the code and verify the ID token; the person's verified email."""
        metadata = await self.metadata()
        try:
            async with self._client() as client:
                token = await client.fetch_token(
                    metadata.token_endpoint, code=code, code_verifier=code_verifier
                )
        except Exception as exc:  # Authlib raises its own errors and httpx's
            log.warning("oidc_code_exchange_failed", error=type(exc).__name__)
            raise SsoFailed() from exc
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise SsoFailed()
        keys = KeySet.import_key_set(await self._get_json(metadata.jwks_uri))  # type: ignore[arg-type]
        try:
            decoded = jwt.decode(id_token, keys, algorithms=ALGORITHMS)
            jwt.JWTClaimsRegistry(
                iss={"essential": True, "value": metadata.issuer},
                aud={"essential": True, "value": self.client_id},
                sub={"essential": True},
                exp={"essential": True},
                nonce={"essential": True, "value": nonce},
            ).validate(decoded.claims)
        except (JoseError, ValueError) as exc:
            log.warning("oidc_id_token_refused", error=type(exc).__name__)
            raise SsoFailed() from exc
        claims = decoded.claims
        email = claims.get("email")
        if not isinstance(email, str) or claims.get("email_verified") is not True:
            log.info("oidc_email_not_verified")
            raise SsoFailed("Your provider did not give a verified email address.")
        return VerifiedIdentity(subject=str(claims["sub"]), email=email)
