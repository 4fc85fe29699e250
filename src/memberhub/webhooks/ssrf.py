"""SSRF protection for outbound webhooks and integrations.

A webhook URL is checked twice: when it is registered (`check_url`, a clear 422 for the
caller) and again on every connection (`GuardedNetworkBackend`), because the name may
resolve elsewhere by the time we send (DNS rebinding). The backend connects to the very
address it checked, so a second DNS answer cannot slip in between the check and the
connection; redirects, if ever followed, open new connections and are checked the same way.

Hosts that are not URLs (an SMTP server) get the same two checks: `check_host` when saved,
`allowed_addresses` before each connection, whose client then connects to the address it
returns.

Addresses that are not globally routable (loopback, private, link-local, carrier-grade NAT,
multicast, reserved, ... and IPv6 forms embedding such an IPv4 address) are refused unless
they fall inside a network of `MEMBERHUB_WEBHOOK_ALLOWED_NETWORKS`.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from memberhub.kit.errors import ValidationFailed
from memberhub.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# host, port -> IP address strings, in the order they should be tried.
Resolver = Callable[[str, int], Awaitable[list[str]]]

ALLOWED_NETWORKS_SETTING = "MEMBERHUB_WEBHOOK_ALLOWED_NETWORKS"
ALLOW_HTTP_SETTING = "MEMBERHUB_WEBHOOK_ALLOW_HTTP"

# Registration should not hang on a slow resolver; sending uses the connect timeout.
REGISTRATION_RESOLVE_TIMEOUT_SECONDS = 10.0

_PRIVATE_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.IPv4Network("10.0.0.0/8"),
    ipaddress.IPv4Network("172.16.0.0/12"),
    ipaddress.IPv4Network("192.168.0.0/16"),
    ipaddress.IPv6Network("fc00::/7"),
)
_CARRIER_GRADE_NAT = ipaddress.IPv4Network("100.64.0.0/10")
# RFC 6052 well-known prefix: the last 32 bits are the IPv4 address a NAT64 gateway reaches.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# RFC 8215 local-use NAT64 prefix: never a public destination.
_NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")
# IETF protocol assignments (RFC 6890): not globally reachable but for two anycast services.
# Python before 3.11.10 and 3.12.4 calls the whole block global.
_PROTOCOL_ASSIGNMENTS = ipaddress.IPv4Network("192.0.0.0/24")
_GLOBAL_PROTOCOL_ASSIGNMENTS = frozenset(
    {ipaddress.IPv4Address("192.0.0.9"), ipaddress.IPv4Address("192.0.0.10")}
)

# Mirrors httpx's default (httpx._config.DEFAULT_LIMITS, which is not public).
_DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


def parse_networks(value: str) -> tuple[IPNetwork, ...]:
    """Parse the comma-separated CIDR setting; empty entries are ignored.

    Host bits must be zero ("10.1.2.3/16" is refused) so that a typo cannot silently open a
    larger network than intended.
    """
    networks: list[IPNetwork] = []
    for raw_entry in value.split(","):
        entry = raw_entry.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=True))
        except ValueError:
            raise ValueError(_bad_network_message(entry)) from None
    return tuple(networks)


def _bad_network_message(entry: str) -> str:
    prefix = f"Invalid network {entry!r} in {ALLOWED_NETWORKS_SETTING}"
    try:
        loose = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return (
            f"{prefix}: expected an IPv4 or IPv6 network in CIDR notation, "
            "such as 10.0.0.0/8 or fd00::/8."
        )
    return f"{prefix}: it has host bits set; did you mean {loose}?"


def _is_allowed(ip: IPAddress, allowed: Sequence[IPNetwork]) -> bool:
    # `in` compares integers only, so an IPv4 address could match an IPv6 network: check the
    # version first.
    return any(ip.version == network.version and ip in network for network in allowed)


def _own_refusal_reason(ip: IPAddress) -> str | None:
    """Why `ip` itself may not be contacted, not looking at any embedded IPv4 address."""
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if _is_allowed(ip, _PRIVATE_NETWORKS):
        return "private"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CARRIER_GRADE_NAT:
        return "carrier-grade NAT"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"
    if ip.is_reserved:
        return "reserved"
    if (
        not ip.is_global
        or (isinstance(ip, ipaddress.IPv6Address) and ip in _NAT64_LOCAL_USE)
        or (
            isinstance(ip, ipaddress.IPv4Address)
            and ip in _PROTOCOL_ASSIGNMENTS
            and ip not in _GLOBAL_PROTOCOL_ASSIGNMENTS
        )
    ):
        return "not globally routable"
    return None


def refusal_reason(ip: IPAddress, allowed: Sequence[IPNetwork]) -> str | None:
    """None when `ip` may be contacted, else a short reason such as "loopback".

    An address inside one of the `allowed` networks is always accepted. IPv4-mapped IPv6
    addresses (::ffff:a.b.c.d) are judged as the IPv4 address they reach, NAT64 addresses
    (64:ff9b::/96) as the IPv4 address they embed. 6to4 addresses (2002::/16) are always
    refused, with the embedded IPv4 address's reason when it has one.
    """
    if _is_allowed(ip, allowed):
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
        if _is_allowed(ip, allowed):
            return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64:
            # The prefix lies inside ::/8, which `ipaddress` calls reserved; only the
            # embedded IPv4 address tells where the gateway would connect.
            return _embedded_refusal_reason(
                ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64", allowed
            )
        if ip.sixtofour is not None:
            # 6to4 is deprecated (RFC 7526) and newer Pythons no longer call 2002::/16 global;
            # refuse it on every Python, naming the embedded address's reason when it has one.
            reason = _embedded_refusal_reason(ip.sixtofour, "6to4", allowed)
            return reason or "not globally routable"
    return _own_refusal_reason(ip)


def _embedded_refusal_reason(
    embedded: ipaddress.IPv4Address, via: str, allowed: Sequence[IPNetwork]
) -> str | None:
    if _is_allowed(embedded, allowed):
        return None
    reason = _own_refusal_reason(embedded)
    return None if reason is None else f"{reason} IPv4 via {via}"


def _first_refusal(
    addresses: Iterable[str], allowed: Sequence[IPNetwork]
) -> tuple[str, str] | None:
    """The first (address, reason) that may not be contacted, if any."""
    for address in addresses:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            # Fail closed: a resolver handing back something else is not to be trusted.
            return address, "not an IP address"
        reason = refusal_reason(ip, allowed)
        if reason is not None:
            return address, reason
    return None


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class WebhookUrlRefused(ValidationFailed):
    code = "WEBHOOK_URL_REFUSED"
    default_message = "This webhook URL may not be used."


@dataclass(frozen=True)
class UrlPolicy:
    """Which webhook URLs may be registered and contacted."""

    allow_http: bool
    allowed_networks: tuple[IPNetwork, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> UrlPolicy:
        return cls(
            allow_http=settings.webhook_allow_http,
            allowed_networks=parse_networks(settings.webhook_allowed_networks),
        )

    @property
    def allowed_schemes(self) -> tuple[str, ...]:
        return ("https", "http") if self.allow_http else ("https",)


# Lookups run in threads of their own: a name server that never answers ties up these, not
# the event loop's default executor that everything else shares.
_DNS_THREADS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="memberhub-dns")
# Answers are reused briefly, and concurrent lookups of one name share a single query.
DNS_CACHE_SECONDS = 30.0
_answers: dict[tuple[str, int], tuple[float, list[str]]] = {}
_lookups: dict[tuple[str, int], asyncio.Future[list[str]]] = {}


async def resolve(host: str, port: int) -> list[str]:
    """The default resolver: the system's getaddrinfo, unique addresses in the order given."""
    key = (host, port)
    loop = asyncio.get_running_loop()
    cached = _answers.get(key)
    if cached is not None and loop.time() - cached[0] < DNS_CACHE_SECONDS:
        return list(cached[1])
    pending = _lookups.get(key)
    if pending is not None and pending.get_loop() is loop:
        return list(await asyncio.shield(pending))
    future: asyncio.Future[list[str]] = loop.create_future()
    _lookups[key] = future
    try:
        addresses = await loop.run_in_executor(_DNS_THREADS, _lookup, host, port)
    except BaseException as exc:
        future.set_exception(exc if isinstance(exc, Exception) else OSError("lookup cancelled"))
        future.exception()  # retrieved: nobody else may be waiting
        raise
    finally:
        _lookups.pop(key, None)
    future.set_result(addresses)
    _answers[key] = (loop.time(), addresses)
    return list(addresses)


def _lookup(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for family, _type, _proto, _canonname, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _how_to_allow(address: str) -> str:
    ip = _ip_literal(address)
    example = f"{address}/{ip.max_prefixlen}" if ip is not None else "10.0.0.0/8"
    return (
        f"To deliver to it anyway, add a network containing it to {ALLOWED_NETWORKS_SETTING} "
        f"(comma-separated CIDRs, e.g. {example})."
    )


def _refused(message: str, reason: str, **details: str) -> WebhookUrlRefused:
    return WebhookUrlRefused(message, details={"field": "url", "reason": reason, **details})


async def check_url(url: str, policy: UrlPolicy, *, resolver: Resolver = resolve) -> None:
    """Validate a webhook URL at registration; raise WebhookUrlRefused when it may not be used.

    The URL is parsed by httpx, the client that will send to it, so that both agree on the
    host. Every address the host resolves to must be acceptable, not just one of them.
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise _refused(f"The webhook URL is not a valid URL: {exc}.", "invalid URL") from None

    if parsed.scheme not in policy.allowed_schemes:
        if policy.allow_http:
            message = "Webhook URLs must use http:// or https://."
        else:
            message = (
                "Webhook URLs must use https://; plain http:// is accepted only when "
                f"{ALLOW_HTTP_SETTING} is true."
            )
        raise _refused(message, "scheme not allowed", scheme=parsed.scheme)

    host = parsed.raw_host.decode("ascii")
    if not host:
        raise _refused("The webhook URL has no host.", "no host")
    if parsed.userinfo:
        raise _refused(
            "Webhook URLs may not contain credentials (user:password@); authenticate the "
            "webhook with its signature instead.",
            "credentials in URL",
        )

    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise _refused(
            f"The webhook URL's port {parsed.port} is not a port (1 to 65535).", "invalid port"
        )

    literal = _ip_literal(host)
    if literal is not None:
        reason = refusal_reason(literal, policy.allowed_networks)
        if reason is not None:
            raise _refused(
                f"The webhook URL points at {host} ({reason}), which webhooks may not reach. "
                + _how_to_allow(host),
                reason,
                address=host,
            )
        return

    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        async with asyncio.timeout(REGISTRATION_RESOLVE_TIMEOUT_SECONDS):
            addresses = await resolver(host, port)
    except TimeoutError:
        raise _unresolvable(host, "the lookup timed out") from None
    except OSError as exc:
        raise _unresolvable(host, str(exc)) from None
    except UnicodeError:
        # An empty or over-long label (`a..com`, 64 characters) fails IDNA encoding.
        raise _unresolvable(host, "it is not a valid host name") from None
    if not addresses:
        raise _unresolvable(host, "no addresses")

    refusal = _first_refusal(addresses, policy.allowed_networks)
    if refusal is not None:
        address, reason = refusal
        raise _refused(
            f"The webhook host {host!r} resolves to {address} ({reason}), which webhooks may "
            "not reach; every address of the host must be reachable. " + _how_to_allow(address),
            reason,
            address=address,
            host=host,
        )


def _unresolvable(host: str, cause: str) -> WebhookUrlRefused:
    return _refused(
        f"The webhook host {host!r} could not be resolved ({cause}); check the hostname.",
        "unresolvable",
        host=host,
    )


async def check_host(
    host: str,
    port: int,
    policy: UrlPolicy,
    *,
    what: str = "host",
    resolver: Resolver | None = None,
) -> None:
    """Validate a bare host and port (an SMTP server, say) when it is saved, as `check_url`
    does a URL's: raise WebhookUrlRefused when it is, or resolves to, an address outbound
    connections may not reach. `what` names it in the message ("SMTP host")."""
    literal = _ip_literal(host.strip("[]"))
    if literal is not None:
        reason = refusal_reason(literal, policy.allowed_networks)
        if reason is not None:
            raise _refused(
                f"The {what} {host} ({reason}) is not an address outbound connections may "
                "reach. " + _how_to_allow(str(literal)),
                reason,
                address=str(literal),
            )
        return
    try:
        async with asyncio.timeout(REGISTRATION_RESOLVE_TIMEOUT_SECONDS):
            addresses = await (resolver or resolve)(host, port)
    except TimeoutError:
        raise _unresolvable_host(what, host, "the lookup timed out") from None
    except OSError as exc:
        raise _unresolvable_host(what, host, str(exc)) from None
    except UnicodeError:
        raise _unresolvable_host(what, host, "it is not a valid host name") from None
    if not addresses:
        raise _unresolvable_host(what, host, "no addresses")
    refusal = _first_refusal(addresses, policy.allowed_networks)
    if refusal is not None:
        address, reason = refusal
        raise _refused(
            f"The {what} {host!r} resolves to {address} ({reason}), which outbound "
            "connections may not reach; every address of the host must be reachable. "
            + _how_to_allow(address),
            reason,
            address=address,
            host=host,
        )


def _unresolvable_host(what: str, host: str, cause: str) -> WebhookUrlRefused:
    return _refused(
        f"The {what} {host!r} could not be resolved ({cause}); check the hostname.",
        "unresolvable",
        host=host,
    )


async def allowed_addresses(
    host: str, port: int, policy: UrlPolicy, *, resolver: Resolver | None = None
) -> list[str]:
    """The addresses to connect to for `host`, resolved now and every one checked: for a
    client that is not httpx (SMTP) and connects to what this returns, so that a second
    DNS answer (rebinding) cannot slip in between the check and the connection. Raises
    DestinationRefused, or OSError when the name does not resolve."""
    literal = _ip_literal(host.strip("[]"))
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = await (resolver or resolve)(host, port)
        except UnicodeError as exc:
            raise OSError(f"Could not resolve {host!r}: {exc}") from None
    _require_allowed(host, addresses, policy)
    return addresses


def check_destination_now(host: str, port: int, policy: UrlPolicy) -> None:
    """`allowed_addresses` for a client that runs in a thread and resolves the name again
    itself (the AWS SDK), called just before it connects: the host it is about to reach
    (a bucket's own host name included) is checked, though a DNS answer changing in between
    cannot be ruled out as it is where the client connects to the checked address. Raises
    DestinationRefused, or OSError when the name does not resolve."""
    literal = _ip_literal(host.strip("[]"))
    _require_allowed(host, [str(literal)] if literal is not None else _lookup(host, port), policy)


def _require_allowed(host: str, addresses: Sequence[str], policy: UrlPolicy) -> None:
    """Raise unless `host` resolved, to addresses the policy allows every one of."""
    if not addresses:
        raise OSError(f"Could not resolve {host!r}: no addresses.")
    refusal = _first_refusal(addresses, policy.allowed_networks)
    if refusal is not None:
        address, reason = refusal
        raise DestinationRefused(host, reason, None if address == host else address)


class DestinationRefused(Exception):
    """Raised at connect time when the destination resolves to a refused address.

    This is what DNS rebinding looks like: the host passed `check_url` at registration but now
    resolves somewhere webhooks may not go. httpx does not wrap it, so it reaches the caller
    as is.
    """

    def __init__(self, host: str, reason: str, address: str | None = None) -> None:
        self.host = host
        self.reason = reason
        self.address = address
        target = host if address is None else f"{host!r}, which resolves to {address}"
        super().__init__(
            f"Refusing to connect to {target} ({reason}). To allow it, add a network "
            f"containing it to {ALLOWED_NETWORKS_SETTING}."
        )


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that only connects to acceptable addresses.

    `connect_tcp` resolves the host itself, refuses the connection if any address is refused,
    and otherwise connects to the checked addresses in order (not to the host name, so the
    inner backend cannot resolve again and get a different answer). TLS is unaffected:
    httpcore passes the host name separately to `start_tls` for SNI and certificate checks,
    and the Host header comes from the request URL.
    """

    def __init__(
        self,
        policy: UrlPolicy,
        *,
        resolver: Resolver = resolve,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._policy = policy
        self._resolver = resolver
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()

    # The signature, `timeout` parameter included, is httpcore's AsyncNetworkBackend interface.
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                addresses = await self._resolve(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"Resolving {host!r} timed out.") from None
        refusal = _first_refusal(addresses, self._policy.allowed_networks)
        if refusal is not None:
            address, reason = refusal
            raise DestinationRefused(host, reason, address)

        # Materialised: an iterator would be exhausted after the first attempt.
        options = None if socket_options is None else list(socket_options)
        last_error: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
        assert last_error is not None  # `_resolve` never returns an empty list
        raise last_error

    async def _resolve(self, host: str, port: int) -> list[str]:
        if _ip_literal(host) is not None:
            return [host]
        try:
            addresses = await self._resolver(host, port)
        except TimeoutError:
            raise  # an OSError too, but connect_tcp reports it as ConnectTimeout
        except (OSError, UnicodeError) as exc:
            raise httpcore.ConnectError(f"Could not resolve {host!r}: {exc}") from exc
        if not addresses:
            raise httpcore.ConnectError(f"Could not resolve {host!r}: no addresses.")
        return addresses

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise DestinationRefused(path, "unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@functools.cache
def verifying_context(trust_env: bool = True) -> ssl.SSLContext:
    """The default TLS context (certificates verified against the CA bundle, or the bundle
    SSL_CERT_FILE / SSL_CERT_DIR name when `trust_env`), made once per process: loading the
    bundle takes tens of milliseconds, and every transport would otherwise load it again."""
    return httpx.create_ssl_context(trust_env=trust_env)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    """AsyncHTTPTransport whose connection pool connects through a GuardedNetworkBackend.

    httpx builds its httpcore pool in `__init__` without a `network_backend` argument, so the
    pool is rebuilt here with the same arguments plus the backend. Proxies and Unix sockets
    are not accepted: either would bypass the address check.
    """

    def __init__(
        self,
        backend: GuardedNetworkBackend,
        *,
        verify: ssl.SSLContext | bool = True,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = _DEFAULT_LIMITS,
        local_address: str | None = None,
        retries: int = 0,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> None:
        if verify is True:
            ssl_context = verifying_context(trust_env)
        else:
            ssl_context = httpx.create_ssl_context(verify=verify, trust_env=trust_env)
        super().__init__(
            verify=ssl_context,
            trust_env=trust_env,
            http1=http1,
            http2=http2,
            limits=limits,
            local_address=local_address,
            retries=retries,
            socket_options=socket_options,
        )
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=http1,
            http2=http2,
            local_address=local_address,
            retries=retries,
            socket_options=socket_options,
            network_backend=backend,
        )


def guarded_transport(
    policy: UrlPolicy, *, resolver: Resolver = resolve, **transport_kwargs: Any
) -> httpx.AsyncHTTPTransport:
    """An httpx transport that refuses (DestinationRefused) to connect to refused addresses.

    `transport_kwargs` are those of httpx.AsyncHTTPTransport except `proxy`, `uds` and the
    deprecated `cert` (pass an ssl.SSLContext as `verify` instead). Create
    the client with `httpx.AsyncClient(transport=..., trust_env=False)`: proxies would connect
    to the target on our behalf, bypassing the check. (httpx already ignores the proxy
    environment variables when a transport is given, but trust_env=False also keeps .netrc
    credentials and other environment settings out of webhook requests.)
    """
    for bypass in ("proxy", "uds"):
        if bypass in transport_kwargs:
            raise ValueError(f"guarded_transport does not accept {bypass!r}: it bypasses the check")
    backend = GuardedNetworkBackend(policy, resolver=resolver)
    return _GuardedTransport(backend, **transport_kwargs)
