"""A fake OpenID Connect provider, for the console's single sign-on.

`running_oidc_provider` serves it on a free port of 127.0.0.1 (uvicorn in a thread, as
`tests.fakes.oauth_server` does):

    async with running_oidc_provider(redirect_uris=[callback]) as provider:
        provider.user = {"sub": "u1", "email": "ana@example.org", "email_verified": True}
        ...the browser follows the console to provider.url + "/authorize"...

- `GET /.well-known/openid-configuration`: discovery (issuer, endpoints, JWKS URI).
- `GET /jwks`: the public signing key (RS256, with a `kid`).
- `GET /authorize` stands for `user` signing in and consenting at once: it checks the client,
  the registered `redirect_uri`, `response_type=code`, the `openid` scope, a nonce and a PKCE
  S256 challenge, and answers 302 to `redirect_uri?code=…&state=…` (400 without redirecting
  when the client or redirect URI is wrong).
- `POST /token` takes the client's credentials by HTTP Basic or in the body, and grants
  `authorization_code` once per code, bound to the client and `redirect_uri`, checked
  against the PKCE challenge; it returns an RS256 ID token carrying the request's nonce.

`tamper` makes the next ID tokens wrong in one way (`signature`, `nonce`, `audience`,
`issuer`, `expired`), for the tests that the client refuses them.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus, urlencode

from joserfc import jwt
from joserfc.jwk import RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from tests.support_server import bind_local_socket, serving_in_thread

CLIENT_ID = "memberhub-console"
CLIENT_SECRET = "console-client-secret"
ID_TOKEN_TTL_SECONDS = 300


def _key(kid: str) -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"})


@dataclass
class FakeOidcProvider:
    url: str
    redirect_uris: list[str]
    client_id: str = CLIENT_ID
    client_secret: str = CLIENT_SECRET
    user: dict[str, Any] = field(
        default_factory=lambda: {
            "sub": "user-1",
            "email": "ana@example.org",
            "email_verified": True,
        }
    )
    tamper: str | None = None
    # Auth0 publishes its issuer with a trailing "/", in discovery and in every ID token.
    issuer_slash: bool = False
    key: RSAKey = field(default_factory=lambda: _key("fake-1"))
    # Signs tokens the JWKS does not publish (same kid: only the signature is wrong).
    impostor_key: RSAKey = field(default_factory=lambda: _key("fake-1"))
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    authorize_requests: list[dict[str, str]] = field(default_factory=list)
    token_requests: int = 0

    @property
    def issuer(self) -> str:
        return self.url + "/" if self.issuer_slash else self.url

    # --- the endpoints ---------------------------------------------------------------

    async def discovery(self, _request: Request) -> Response:
        return JSONResponse(
            {
                "issuer": self.issuer,
                "authorization_endpoint": f"{self.url}/authorize",
                "token_endpoint": f"{self.url}/token",
                "jwks_uri": f"{self.url}/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "client_secret_post",
                ],
            }
        )

    async def jwks(self, _request: Request) -> Response:
        return JSONResponse({"keys": [self.key.as_dict(private=False)]})

    async def authorize(self, request: Request) -> Response:
        params = dict(request.query_params)
        self.authorize_requests.append(params)
        if params.get("client_id") != self.client_id:
            return JSONResponse({"error": "invalid_client"}, status_code=400)
        redirect_uri = params.get("redirect_uri", "")
        if redirect_uri not in self.redirect_uris:
            return JSONResponse({"error": "invalid_redirect_uri"}, status_code=400)
        problem = None
        if params.get("response_type") != "code":
            problem = "unsupported_response_type"
        elif "openid" not in params.get("scope", "").split():
            problem = "invalid_scope"
        elif (
            not params.get("nonce")
            or params.get("code_challenge_method") != "S256"
            or not params.get("code_challenge")
        ):
            problem = "invalid_request"
        if problem is not None:
            query = {"error": problem, "state": params.get("state", "")}
            return RedirectResponse(f"{redirect_uri}?{urlencode(query)}", status_code=302)
        code = secrets.token_urlsafe(24)
        self.codes[code] = {
            "redirect_uri": redirect_uri,
            "challenge": params["code_challenge"],
            "nonce": params["nonce"],
            "user": dict(self.user),
        }
        query = {"code": code, "state": params.get("state", "")}
        return RedirectResponse(f"{redirect_uri}?{urlencode(query)}", status_code=302)

    def _client_of(self, request: Request, form: dict[str, str]) -> tuple[str, str] | None:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic "):
            if "client_secret" in form:
                return None
            try:
                client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
            except ValueError:
                return None
            return unquote_plus(client_id), unquote_plus(secret)
        if "client_id" in form and "client_secret" in form:
            return form["client_id"], form["client_secret"]
        return None

    async def token(self, request: Request) -> Response:
        self.token_requests += 1
        form = {k: str(v) for k, v in (await request.form()).items()}
        if self._client_of(request, form) != (self.client_id, self.client_secret):
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        if form.get("grant_type") != "authorization_code":
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        grant = self.codes.pop(form.get("code", ""), None)
        if grant is None or grant["redirect_uri"] != form.get("redirect_uri"):
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != grant["challenge"]:
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        return JSONResponse(
            {
                "access_token": secrets.token_urlsafe(24),
                "token_type": "Bearer",
                "expires_in": 300,
                "scope": "openid email profile",
                "id_token": self.id_token(grant["user"], grant["nonce"]),
            }
        )

    def id_token(self, user: dict[str, Any], nonce: str) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.client_id,
            "iat": now,
            "exp": now + ID_TOKEN_TTL_SECONDS,
            "nonce": nonce,
            **user,
        }
        key = self.key
        if self.tamper == "signature":
            key = self.impostor_key
        elif self.tamper == "nonce":
            claims["nonce"] = "another-nonce"
        elif self.tamper == "audience":
            claims["aud"] = "another-client"
        elif self.tamper == "issuer":
            claims["iss"] = "https://impostor.example"
        elif self.tamper == "issuer-slash":
            claims["iss"] = self.issuer.rstrip("/") if self.issuer_slash else self.issuer + "/"
        elif self.tamper == "expired":
            claims["exp"] = now - 3600
        return jwt.encode({"alg": "RS256", "kid": key.kid or ""}, claims, key)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self.discovery),
                Route("/jwks", self.jwks),
                Route("/authorize", self.authorize),
                Route("/token", self.token, methods=["POST"]),
            ]
        )


@asynccontextmanager
async def running_oidc_provider(*, redirect_uris: Iterable[str]) -> AsyncIterator[FakeOidcProvider]:
    sock, url = bind_local_socket()
    provider = FakeOidcProvider(url=url, redirect_uris=list(redirect_uris))
    async with serving_in_thread(provider.app(), sock, name="fake-oidc", lifespan="off"):
        yield provider
