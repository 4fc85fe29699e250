"""A fake OAuth 2.0 authorization server with a protected API, for connecting to vendors.

`running_oauth_server` serves it on a free port of 127.0.0.1, under uvicorn in a thread with
its own event loop (as `tests.fakes.webhook_receiver` does):

    async with running_oauth_server(redirect_uris=["http://testserver/callback"]) as server:
        ...send the browser (an httpx client) to server.authorize_url with PKCE...
        ...exchange the code at server.token_url, call f"{server.url}/api/me"...
        server.expire_access_tokens()
        ...the next API call gets 401 and the code under test must refresh...
        assert server.token_requests == ["authorization_code", "refresh_token"]

- `GET /oauth/authorize` stands for a user who is already signed in and approves at once:
  it answers 302 to `redirect_uri?code=…&state=…`. Requests that can't be trusted to
  redirect (unknown client, unregistered `redirect_uri`) get 400 and no redirect; other
  errors are redirected as RFC 6749 §4.1.2.1 says. PKCE with S256 is required (RFC 7636).
- `POST /oauth/token` takes client credentials in the body or by HTTP Basic (not both) and
  grants `authorization_code` (single use, bound to client and `redirect_uri`, checked
  against the PKCE challenge) and `refresh_token` (rotated by default: each refresh returns
  a new refresh token and invalidates the old one). Using a code twice also revokes the
  tokens first issued for it (RFC 6749 §4.1.2).
- `GET /api/me` and any other `GET /api/…` (echoed back) require `Authorization: Bearer`;
  missing, unknown, expired or revoked tokens get 401 with `WWW-Authenticate` per RFC 6750.

Time is the real clock plus `advance_clock`, so expiry can be tested without waiting.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response

from tests.support_server import bind_local_socket, serving_in_thread

DEFAULT_CLIENT_ID = "memberhub-test-client"
DEFAULT_CLIENT_SECRET = "memberhub-test-secret"
DEFAULT_REDIRECT_URI = "http://127.0.0.1/oauth/callback"
DEFAULT_SCOPES = ("read", "write", "offline_access")
CODE_TTL_SECONDS = 60
REALM = "fake-oauth"
# RFC 7636 §4.1: 43 to 128 characters of [A-Z] / [a-z] / [0-9] / "-" / "." / "_" / "~".
PKCE_VALUE = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def s256_challenge(verifier: str) -> str:
    """The S256 code challenge of a PKCE `verifier` (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class OAuthError(Exception):
    """An RFC 6749 error answer of the token endpoint."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    # Whether the authorization request named the redirect_uri, so the token request must.
    redirect_uri_given: bool
    challenge: str
    scope: str
    expires_at: float
    used: bool = False
    issued_access: list[str] = field(default_factory=list)
    issued_refresh: list[str] = field(default_factory=list)


@dataclass
class _AccessToken:
    client_id: str
    scope: str
    expires_at: float
    revoked: bool = False


@dataclass
class _RefreshToken:
    client_id: str
    scope: str
    revoked: bool = False


@dataclass(frozen=True)
class ResourceCall:
    """One request to the protected API, as answered."""

    path: str
    status: int
    token: str | None


class FakeOAuthServer:
    """The server's registrations, tokens and what it has seen; safe to use from any thread."""

    def __init__(
        self,
        url: str,
        *,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        redirect_uris: Iterable[str] = (DEFAULT_REDIRECT_URI,),
        access_token_ttl: int = 3600,
        rotate_refresh_tokens: bool = True,
        scopes: Iterable[str] = DEFAULT_SCOPES,
        user: Mapping[str, Any] | None = None,
        client_auth: Literal["any", "basic"] = "any",
    ) -> None:
        self.url = url
        # "basic": the client must authenticate by HTTP Basic, as Pipedrive's server asks.
        self.client_auth = client_auth
        self.authorize_url = f"{url}/oauth/authorize"
        self.token_url = f"{url}/oauth/token"
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uris = tuple(redirect_uris)
        self.access_token_ttl = access_token_ttl
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.scopes = frozenset(scopes)
        self.user = dict(user or {"id": "user_1", "email": "owner@example.com", "name": "Ada"})
        self._lock = threading.Lock()
        self._clock_offset = 0.0
        self._codes: dict[str, _Code] = {}
        self._access: dict[str, _AccessToken] = {}
        self._refresh: dict[str, _RefreshToken] = {}
        self._denials: list[str] = []
        self._token_requests: list[str] = []
        self._resource_calls: list[ResourceCall] = []
        self._issued_access: list[str] = []

    # ------------------------------------------------------------------ programming

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far invalid, as if it had expired early."""
        with self._lock:
            for token in self._access.values():
                token.revoked = True

    def revoke_refresh_tokens(self) -> None:
        """Make every refresh token issued so far invalid, as a user revoking access does."""
        with self._lock:
            for token in self._refresh.values():
                token.revoked = True

    def deny_next_authorization(self, error: str = "access_denied") -> None:
        """The next valid authorization request is refused by the user with `error`."""
        with self._lock:
            self._denials.append(error)

    def advance_clock(self, seconds: float) -> None:
        """Move the server's clock forward, for code and access-token expiry."""
        with self._lock:
            self._clock_offset += seconds

    # ------------------------------------------------------------------ inspection

    @property
    def token_requests(self) -> list[str]:
        """The `grant_type` of every token request, in order ("" when missing)."""
        with self._lock:
            return list(self._token_requests)

    @property
    def resource_calls(self) -> list[ResourceCall]:
        """Every request to `/api/…`, in order, with the status it got."""
        with self._lock:
            return list(self._resource_calls)

    @property
    def issued_access_tokens(self) -> list[str]:
        """Every access token issued, in order."""
        with self._lock:
            return list(self._issued_access)

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        path = request.url.path
        response: Response
        if path == "/oauth/authorize" and request.method == "GET":
            response = self._authorize(dict(request.query_params))
        elif path == "/oauth/token":
            body = (await request.body()).decode()
            response = self._token(request.method, dict(parse_qsl(body)), request.headers)
        elif path.startswith("/api/"):
            response = self._resource(request)
        else:
            response = PlainTextResponse("not found", status_code=404)
        await response(scope, receive, send)

    def _now(self) -> float:
        return time.time() + self._clock_offset

    # ------------------------------------------------------------------ authorize

    def _authorize(self, query: dict[str, str]) -> Response:
        client_id = query.get("client_id")
        if client_id != self.client_id:
            return PlainTextResponse("invalid_request: unknown client_id", status_code=400)
        redirect_uri = query.get("redirect_uri")
        redirect_uri_given = redirect_uri is not None
        if redirect_uri is None:
            if len(self.redirect_uris) != 1:
                return PlainTextResponse("invalid_request: redirect_uri required", 400)
            redirect_uri = self.redirect_uris[0]
        if redirect_uri not in self.redirect_uris:
            return PlainTextResponse("invalid_request: redirect_uri not registered", 400)
        state = query.get("state")

        def fail(error: str, description: str) -> Response:
            return _redirect(redirect_uri, error=error, error_description=description, state=state)

        if query.get("response_type") != "code":
            if "response_type" not in query:
                return fail("invalid_request", "response_type is required")
            return fail("unsupported_response_type", "only response_type=code is supported")
        challenge = query.get("code_challenge")
        if not challenge:
            return fail("invalid_request", "code_challenge is required")
        if query.get("code_challenge_method") != "S256":
            return fail("invalid_request", "code_challenge_method must be S256")
        if not PKCE_VALUE.match(challenge):
            return fail("invalid_request", "code_challenge is malformed")
        requested = query.get("scope", "").split()
        unknown = [name for name in requested if name not in self.scopes]
        if unknown:
            return fail("invalid_scope", f"unknown scope: {' '.join(unknown)}")
        with self._lock:
            if self._denials:
                return fail(self._denials.pop(0), "the user refused")
            code = secrets.token_urlsafe(24)
            self._codes[code] = _Code(
                client_id=client_id,
                redirect_uri=redirect_uri,
                redirect_uri_given=redirect_uri_given,
                challenge=challenge,
                scope=" ".join(requested) or " ".join(sorted(self.scopes)),
                expires_at=self._now() + CODE_TTL_SECONDS,
            )
        return _redirect(redirect_uri, code=code, state=state)

    # ------------------------------------------------------------------ token

    def _token(self, method: str, form: dict[str, str], headers: Mapping[str, str]) -> Response:
        grant_type = form.get("grant_type", "")
        with self._lock:
            self._token_requests.append(grant_type)
        try:
            if method != "POST":
                raise OAuthError("invalid_request", "the token endpoint takes POST", 405)
            client_id = self._authenticate_client(form, headers.get("authorization"))
            with self._lock:
                if grant_type == "authorization_code":
                    payload = self._exchange_code(client_id, form)
                elif grant_type == "refresh_token":
                    payload = self._refresh_tokens(client_id, form)
                elif not grant_type:
                    raise OAuthError("invalid_request", "grant_type is required")
                else:
                    raise OAuthError("unsupported_grant_type", f"{grant_type} is not supported")
        except OAuthError as error:
            extra: dict[str, str] = {}
            if error.status == 401:
                extra["www-authenticate"] = f'Basic realm="{REALM}"'
            return JSONResponse(
                {"error": error.error, "error_description": error.description},
                status_code=error.status,
                headers={**_NO_STORE, **extra},
            )
        return JSONResponse(payload, headers=_NO_STORE)

    def _authenticate_client(self, form: dict[str, str], authorization: str | None) -> str:
        scheme, _, credentials = (authorization or "").partition(" ")
        basic = scheme.lower() == "basic"
        if basic and "client_secret" in form:
            raise OAuthError("invalid_request", "use one client authentication method")
        if not basic and self.client_auth == "basic":
            raise OAuthError("invalid_client", "authenticate the client by HTTP Basic", 401)
        if basic:
            try:
                decoded = base64.b64decode(credentials, validate=True).decode()
            except ValueError:
                raise OAuthError("invalid_client", "malformed Basic credentials", 401) from None
            raw_id, _, raw_secret = decoded.partition(":")
            # RFC 6749 §2.3.1: both are form-encoded before being joined.
            client_id, client_secret = unquote_plus(raw_id), unquote_plus(raw_secret)
            if form.get("client_id", client_id) != client_id:
                raise OAuthError("invalid_request", "client_id differs from the credentials")
        else:
            client_id = form.get("client_id", "")
            client_secret = form.get("client_secret", "")
        valid_id = secrets.compare_digest(client_id.encode(), self.client_id.encode())
        valid_secret = secrets.compare_digest(client_secret.encode(), self.client_secret.encode())
        if not (valid_id and valid_secret):
            raise OAuthError("invalid_client", "client authentication failed", 401)
        return client_id

    def _exchange_code(self, client_id: str, form: dict[str, str]) -> dict[str, Any]:
        code_value = form.get("code")
        if not code_value:
            raise OAuthError("invalid_request", "code is required")
        code = self._codes.get(code_value)
        if code is None or code.client_id != client_id:
            raise OAuthError("invalid_grant", "unknown authorization code")
        if code.used:
            # RFC 6749 §4.1.2: a replayed code revokes what it was exchanged for.
            for token in code.issued_access:
                self._access[token].revoked = True
            for token in code.issued_refresh:
                self._refresh[token].revoked = True
            raise OAuthError("invalid_grant", "authorization code already used")
        if code.expires_at <= self._now():
            raise OAuthError("invalid_grant", "authorization code expired")
        if code.redirect_uri_given and form.get("redirect_uri") != code.redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri does not match the authorization")
        verifier = form.get("code_verifier")
        if not verifier:
            raise OAuthError("invalid_request", "code_verifier is required")
        if not PKCE_VALUE.match(verifier) or not secrets.compare_digest(
            s256_challenge(verifier), code.challenge
        ):
            raise OAuthError("invalid_grant", "code_verifier does not match the code_challenge")
        code.used = True
        access, refresh = self._issue(client_id, code.scope)
        code.issued_access.append(access)
        code.issued_refresh.append(refresh)
        return self._token_payload(access, refresh, code.scope)

    def _refresh_tokens(self, client_id: str, form: dict[str, str]) -> dict[str, Any]:
        refresh_value = form.get("refresh_token")
        if not refresh_value:
            raise OAuthError("invalid_request", "refresh_token is required")
        refresh = self._refresh.get(refresh_value)
        if refresh is None or refresh.revoked or refresh.client_id != client_id:
            raise OAuthError("invalid_grant", "refresh token is invalid, expired or revoked")
        scope = refresh.scope
        if "scope" in form:
            requested = form["scope"].split()
            if not set(requested) <= set(refresh.scope.split()):
                raise OAuthError("invalid_scope", "scope exceeds the original grant")
            scope = " ".join(requested)
        if self.rotate_refresh_tokens:
            refresh.revoked = True
            access, new_refresh = self._issue(client_id, scope, refresh_scope=refresh.scope)
        else:
            access, _ = self._issue(client_id, scope, with_refresh=False)
            new_refresh = refresh_value
        return self._token_payload(access, new_refresh, scope)

    def _issue(
        self,
        client_id: str,
        scope: str,
        *,
        with_refresh: bool = True,
        refresh_scope: str | None = None,
    ) -> tuple[str, str]:
        access = secrets.token_urlsafe(32)
        self._access[access] = _AccessToken(
            client_id=client_id, scope=scope, expires_at=self._now() + self.access_token_ttl
        )
        self._issued_access.append(access)
        refresh = ""
        if with_refresh:
            refresh = secrets.token_urlsafe(32)
            # A narrower access token doesn't narrow the grant the refresh token stands for.
            self._refresh[refresh] = _RefreshToken(client_id, refresh_scope or scope)
        return access, refresh

    def _token_payload(self, access: str, refresh: str, scope: str) -> dict[str, Any]:
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.access_token_ttl,
            "refresh_token": refresh,
            "scope": scope,
        }

    # ------------------------------------------------------------------ protected API

    def _resource(self, request: Request) -> Response:
        path = request.url.path
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        with self._lock:
            if scheme.lower() != "bearer" or not token:
                response = _unauthorized(None)
                token_or_none = None
            else:
                token_or_none = token
                record = self._access.get(token)
                if record is None:
                    response = _unauthorized("the access token is unknown")
                elif record.revoked or record.expires_at <= self._now():
                    response = _unauthorized("the access token expired")
                elif request.method != "GET":
                    response = PlainTextResponse(
                        "method not allowed", status_code=405, headers={"allow": "GET"}
                    )
                elif path == "/api/me":
                    response = JSONResponse({**self.user, "scope": record.scope})
                else:
                    response = JSONResponse(
                        {
                            "path": path,
                            "query": dict(request.query_params),
                            "user_id": self.user.get("id"),
                            "client_id": record.client_id,
                            "scope": record.scope,
                        }
                    )
            self._resource_calls.append(ResourceCall(path, response.status_code, token_or_none))
        return response


_NO_STORE = {"cache-control": "no-store", "pragma": "no-cache"}


def _unauthorized(description: str | None) -> Response:
    # RFC 6750 §3.1: without credentials, no error code; with bad ones, invalid_token.
    challenge = f'Bearer realm="{REALM}"'
    if description is not None:
        challenge += f', error="invalid_token", error_description="{description}"'
    body = json.dumps({"error": "invalid_token" if description else "unauthorized"})
    return Response(
        body,
        status_code=401,
        media_type="application/json",
        headers={"www-authenticate": challenge},
    )


def _redirect(redirect_uri: str, **params: str | None) -> Response:
    parts = urlsplit(redirect_uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query += [(name, value) for name, value in params.items() if value is not None]
    location = urlunsplit(parts._replace(query=urlencode(query)))
    return RedirectResponse(location, status_code=302)


@asynccontextmanager
async def running_oauth_server(**kwargs: Any) -> AsyncIterator[FakeOAuthServer]:
    """Serve a fresh `FakeOAuthServer` on 127.0.0.1 until the block ends.

    Keyword arguments are those of `FakeOAuthServer` after `url`.
    """
    sock, base_url = bind_local_socket()
    server = FakeOAuthServer(base_url, **kwargs)
    async with serving_in_thread(
        server, sock, name="fake-oauth-server", lifespan="off", graceful_shutdown=1
    ):
        yield server
